-- sagakit schema version 3 on PostgreSQL: the transactional outbox of remote steps.
-- A command leaves in the journal entry that starts its step or compensation (its envelope in
-- the entry's payload, its topic in the entry's data); the trigger copies it into the outbox
-- in the same transaction, and a relay publishes and deletes it after commit.
-- available_at: not before (a claim by a relay holds it for a lease; a failed publish waits).
CREATE TABLE sagakit_outbox (
    id           bigserial PRIMARY KEY,
    saga_id      text NOT NULL,
    message_id   text NOT NULL UNIQUE,
    topic        text NOT NULL,
    message      text NOT NULL,
    created_at   double precision NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    available_at double precision NOT NULL DEFAULT 0
);
CREATE INDEX sagakit_outbox_available ON sagakit_outbox (available_at, id);

CREATE FUNCTION sagakit_journal_outbox() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.data::jsonb ? 'topic' THEN
        INSERT INTO sagakit_outbox (saga_id, message_id, topic, message, created_at)
        VALUES (NEW.saga_id, NEW.payload::jsonb ->> 'message_id', NEW.data::jsonb ->> 'topic',
                NEW.payload, NEW.at)
        ON CONFLICT (message_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sagakit_journal_outbox AFTER INSERT ON sagakit_journal FOR EACH ROW
WHEN (NEW.kind IN ('step_started', 'compensation_started') AND NEW.payload IS NOT NULL)
EXECUTE FUNCTION sagakit_journal_outbox();
