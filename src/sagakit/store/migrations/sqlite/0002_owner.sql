-- sagakit schema version 2: which worker executes a saga, and how often one died holding it.
ALTER TABLE sagakit_sagas ADD COLUMN owner TEXT;
ALTER TABLE sagakit_sagas ADD COLUMN recoveries INTEGER NOT NULL DEFAULT 0;
CREATE INDEX sagakit_sagas_owner ON sagakit_sagas (owner);
