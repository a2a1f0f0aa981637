-- sagakit schema version 1 on PostgreSQL: sagas (the projection), their journal (the truth),
-- and the workers that own sagas through leases.
CREATE TABLE sagakit_sagas (
    id              text PRIMARY KEY,
    saga_type       text NOT NULL,
    version         integer NOT NULL,
    state           text NOT NULL,
    idempotency_key text UNIQUE,
    input           text,
    output          text,
    error           text,
    current_step    text,
    deadline        double precision,
    created_at      double precision NOT NULL,
    updated_at      double precision NOT NULL,
    owner           text,
    recoveries      integer NOT NULL DEFAULT 0,  -- takeovers in a row without progress
    takeovers       integer NOT NULL DEFAULT 0   -- takeovers from dead workers in all
) WITH (fillfactor = 70);  -- room for HOT updates: a step changes no indexed column
CREATE INDEX sagakit_sagas_active ON sagakit_sagas (created_at, id)
    WHERE state IN ('started', 'running', 'compensating');
CREATE INDEX sagakit_sagas_state ON sagakit_sagas (state, created_at);
CREATE INDEX sagakit_sagas_type ON sagakit_sagas (saga_type, created_at);
CREATE INDEX sagakit_sagas_owner ON sagakit_sagas (owner)
    WHERE state IN ('started', 'running', 'compensating');

CREATE TABLE sagakit_journal (
    saga_id text NOT NULL,
    idx     integer NOT NULL,
    kind    text NOT NULL,
    at      double precision NOT NULL,
    seq     integer,
    step    text,
    attempt integer,
    payload text,
    error   text,
    data    text,
    PRIMARY KEY (saga_id, idx)
);

CREATE TABLE sagakit_workers (
    id           text PRIMARY KEY,
    backend_pid  integer,                -- the connection the worker renews its lease on
    lease_until  timestamptz NOT NULL,
    suspected_at timestamptz,            -- when that connection was first seen gone
    started_at   timestamptz NOT NULL DEFAULT now()
);
