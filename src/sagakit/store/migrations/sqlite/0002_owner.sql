-- sagakit schema version 2: which worker executes a saga; how often in a row it was taken over
-- from a worker that died without getting further (recoveries), and how often in all (takeovers).
ALTER TABLE sagakit_sagas ADD COLUMN owner TEXT;
ALTER TABLE sagakit_sagas ADD COLUMN recoveries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sagakit_sagas ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0;
CREATE INDEX sagakit_sagas_owner ON sagakit_sagas (owner);
