-- sagakit schema version 2 on PostgreSQL: suspended sagas (durable timers, signal waits,
-- child sagas).
-- wake_at: while a saga is unloaded, the time (epoch seconds by the database's clock) from
-- which it may be claimed again. parent_id: the saga that started this one as a child.
ALTER TABLE sagakit_sagas ADD COLUMN wake_at double precision;
ALTER TABLE sagakit_sagas ADD COLUMN parent_id text;
CREATE INDEX sagakit_sagas_wake ON sagakit_sagas (wake_at) WHERE wake_at IS NOT NULL;

-- Signals are stored first and delivered when the saga waits for them; signal_id makes a
-- repeated send a no-op. id orders them by arrival.
CREATE TABLE sagakit_signals (
    id        bigserial PRIMARY KEY,
    saga_id   text NOT NULL,
    signal_id text NOT NULL,
    name      text NOT NULL,
    payload   text,
    at        double precision NOT NULL,
    UNIQUE (saga_id, signal_id)
);
CREATE INDEX sagakit_signals_saga ON sagakit_signals (saga_id, name, id);
CREATE INDEX sagakit_signals_name ON sagakit_signals (name, id);
