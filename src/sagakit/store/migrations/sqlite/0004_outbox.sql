-- sagakit schema version 4: the transactional outbox of remote steps.
-- A command leaves in the journal entry that starts its step or compensation (its envelope in
-- the entry's payload, its topic in the entry's data); this trigger copies it into the outbox
-- in the same transaction, and the relay publishes and deletes it after commit.
-- available_at: not before (a claim by a relay holds it for a lease; a failed publish waits).
CREATE TABLE sagakit_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id      TEXT NOT NULL,
    message_id   TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX sagakit_outbox_available ON sagakit_outbox (available_at, id);
CREATE TRIGGER sagakit_journal_outbox AFTER INSERT ON sagakit_journal
WHEN NEW.kind IN ('step_started', 'compensation_started') AND NEW.payload IS NOT NULL
    AND json_extract(NEW.data, '$.topic') IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO sagakit_outbox (saga_id, message_id, topic, message, created_at)
    VALUES (NEW.saga_id, json_extract(NEW.payload, '$.message_id'),
            json_extract(NEW.data, '$.topic'), NEW.payload, NEW.at);
END;
