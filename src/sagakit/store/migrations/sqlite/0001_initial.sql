-- sagakit schema version 1: sagas (the projection) and their journal (the truth).
CREATE TABLE sagakit_sagas (
    id              TEXT PRIMARY KEY,
    saga_type       TEXT NOT NULL,
    version         INTEGER NOT NULL,
    state           TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    input           TEXT,
    output          TEXT,
    error           TEXT,
    current_step    TEXT,
    deadline        REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX sagakit_sagas_state ON sagakit_sagas (state, created_at);
CREATE INDEX sagakit_sagas_type ON sagakit_sagas (saga_type, created_at);

CREATE TABLE sagakit_journal (
    saga_id TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    at      REAL NOT NULL,
    seq     INTEGER,
    step    TEXT,
    attempt INTEGER,
    payload TEXT,
    error   TEXT,
    data    TEXT,
    PRIMARY KEY (saga_id, idx)
) WITHOUT ROWID;
