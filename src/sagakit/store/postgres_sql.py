"""The named SQL statements of the PostgreSQL store. Every value is a bound parameter."""

from __future__ import annotations

from typing import Final

from sagakit.store.rows import JOURNAL_COLUMNS, SAGA_COLUMNS

ACTIVE: Final = "state IN ('started', 'running', 'compensating')"

_ENTRIES: Final = (
    "unnest($1::text[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[], "
    "$7::int[], $8::text[], $9::text[], $10::text[]) "
    "AS e(saga_id, idx, kind, at, seq, step, attempt, payload, error, data)"
)

# One statement appends the entries of many sagas and updates their rows, but only for the
# sagas the worker ($20) still owns: the fence. It returns the ids that were written.
APPEND: Final = f"""
WITH changes AS (
    SELECT * FROM unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                         $16::float8[], $17::bool[], $18::bool[], $19::bool[])
        AS c(id, state, current_step, output, error, updated_at, set_step, set_output, set_error)
), fenced AS (
    UPDATE sagakit_sagas s SET
        state = COALESCE(c.state, s.state),
        current_step = CASE WHEN c.set_step THEN c.current_step ELSE s.current_step END,
        output = CASE WHEN c.set_output THEN c.output ELSE s.output END,
        error = CASE WHEN c.set_error THEN c.error ELSE s.error END,
        updated_at = c.updated_at
    FROM changes c
    WHERE s.id = c.id AND ($20::text IS NULL OR s.owner = $20::text)
    RETURNING s.id
), written AS (
    INSERT INTO sagakit_journal ({JOURNAL_COLUMNS})
    SELECT e.* FROM {_ENTRIES} WHERE e.saga_id IN (SELECT id FROM fenced)
)
SELECT id FROM fenced
"""

CREATE: Final = f"""
WITH proposed AS (
    SELECT * FROM unnest($11::text[], $12::text[], $13::int[], $14::text[], $15::text[],
                         $16::text[], $17::text[], $18::text[], $19::text[], $20::float8[],
                         $21::float8[], $22::float8[], $23::text[], $24::int[])
        AS p({SAGA_COLUMNS})
), inserted AS (
    INSERT INTO sagakit_sagas ({SAGA_COLUMNS}) SELECT * FROM proposed
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
), written AS (
    INSERT INTO sagakit_journal ({JOURNAL_COLUMNS})
    SELECT e.* FROM {_ENTRIES} WHERE e.saga_id IN (SELECT id FROM inserted)
)
SELECT id FROM inserted
"""

BY_KEYS: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE idempotency_key = ANY($1)"
GET: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE id = $1"
GET_FOR_UPDATE: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE id = $1 FOR UPDATE"
JOURNALS: Final = (
    f"SELECT {JOURNAL_COLUMNS} FROM sagakit_journal WHERE saga_id = ANY($1) ORDER BY saga_id, idx"
)
COUNTS: Final = "SELECT state, count(*) FROM sagakit_sagas GROUP BY state"

# A worker is dead when its lease ran out, or when the connection it registered is gone
# (PostgreSQL closes a killed process's connections at once, so takeover need not wait for the
# lease). A paused worker keeps its connection: only its lease can expire.
CLAIM: Final = f"""
WITH dead AS (
    SELECT w.id FROM sagakit_workers w
    WHERE w.lease_until < now()
       OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid)
), picked AS (
    SELECT s.id FROM sagakit_sagas s
    WHERE s.{ACTIVE}
      AND s.owner IS DISTINCT FROM $1
      AND ($3::text[] IS NULL OR s.saga_type = ANY($3::text[]))
      AND NOT (s.saga_type = ANY($4::text[]))
      AND (s.owner IS NULL
           OR s.owner IN (SELECT id FROM dead)
           OR NOT EXISTS (SELECT 1 FROM sagakit_workers w WHERE w.id = s.owner))
    ORDER BY s.created_at, s.id
    LIMIT $2
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE sagakit_sagas s
SET owner = $1, recoveries = s.recoveries + (s.owner IS NOT NULL)::int
FROM picked WHERE s.id = picked.id
RETURNING {", ".join("s." + c.strip() for c in SAGA_COLUMNS.split(","))}
"""

# Sagas of one type that live workers hold: the type's sagas in flight across the cluster.
IN_FLIGHT: Final = f"""
SELECT count(*) FROM sagakit_sagas s JOIN sagakit_workers w ON w.id = s.owner
WHERE s.{ACTIVE} AND s.saga_type = $1 AND w.lease_until >= now()
  AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid)
"""
TYPE_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext($1))"

HEARTBEAT: Final = """
INSERT INTO sagakit_workers (id, backend_pid, lease_until)
VALUES ($1, pg_backend_pid(), now() + $2 * interval '1 second')
ON CONFLICT (id) DO UPDATE
SET backend_pid = pg_backend_pid(), lease_until = now() + $2 * interval '1 second'
"""
RELEASE: Final = "UPDATE sagakit_sagas SET owner = NULL WHERE owner = $1 AND id = ANY($2)"
RELEASE_ALL: Final = f"UPDATE sagakit_sagas SET owner = NULL WHERE owner = $1 AND {ACTIVE}"
FORGET_WORKER: Final = "DELETE FROM sagakit_workers WHERE id = $1"
UNOWN: Final = "UPDATE sagakit_sagas SET owner = NULL WHERE id = $1"
NOTIFY: Final = "SELECT pg_notify($1, '')"
