"""The named SQL statements of the PostgreSQL store. Every value is a bound parameter."""

from __future__ import annotations

from typing import Final

from sagakit.store.rows import JOURNAL_COLUMNS, SAGA_COLUMNS, SIGNAL_COLUMNS

ACTIVE: Final = "state IN ('started', 'running', 'compensating')"
# Timers are judged by the database's clock, the one clock that all workers share.
# (extract() gives numeric: the cast keeps comparisons with wake_at in double precision.)
DB_NOW: Final = "extract(epoch from clock_timestamp())::float8"

_ENTRIES: Final = (
    "unnest($1::text[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[], "
    "$7::int[], $8::text[], $9::text[], $10::text[]) "
    "AS e(saga_id, idx, kind, at, seq, step, attempt, payload, error, data)"
)

# One statement appends the entries of many sagas and updates their rows, but only for the
# sagas the worker ($21) still owns: the fence. It returns the ids that were written.
APPEND: Final = f"""
WITH changes AS (
    SELECT * FROM unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                         $16::float8[], $17::bool[], $18::bool[], $19::bool[], $20::bool[])
        AS c(id, state, current_step, output, error, updated_at, set_step, set_output, set_error,
             progressed)
), fenced AS (
    UPDATE sagakit_sagas s SET
        state = COALESCE(c.state, s.state),
        current_step = CASE WHEN c.set_step THEN c.current_step ELSE s.current_step END,
        output = CASE WHEN c.set_output THEN c.output ELSE s.output END,
        error = CASE WHEN c.set_error THEN c.error ELSE s.error END,
        updated_at = c.updated_at,
        recoveries = CASE WHEN c.progressed THEN 0 ELSE s.recoveries END
    FROM changes c
    WHERE s.id = c.id AND ($21::text IS NULL OR s.owner = $21::text)
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
                         $21::float8[], $22::float8[], $23::text[], $24::int[], $25::int[],
                         $26::text[], $27::float8[])
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
BY_KEY: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE idempotency_key = $1"
GET: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE id = $1"
GET_FOR_UPDATE: Final = f"SELECT {SAGA_COLUMNS} FROM sagakit_sagas WHERE id = $1 FOR UPDATE"
JOURNALS: Final = (
    f"SELECT {JOURNAL_COLUMNS} FROM sagakit_journal WHERE saga_id = ANY($1) ORDER BY saga_id, idx"
)
COUNTS: Final = "SELECT state, count(*) FROM sagakit_sagas GROUP BY state"
COUNTS_OF_TYPE: Final = (
    "SELECT state, count(*) FROM sagakit_sagas WHERE saga_type = $1 GROUP BY state"
)

# A worker is dead when its lease ran out, or when the connection it registered has been gone
# for $7 seconds: PostgreSQL closes a killed process's connections at once, so takeover need not
# wait for the lease, while a worker whose connection was merely cut reconnects (and clears
# suspected_at) well within the grace. A paused worker keeps its connection: only its lease
# can expire. The first CTE marks workers whose connection is gone; it takes effect for the
# next claim. Sagas that this claim would make suspects ($5 takeovers in a row without
# progress) are claimed only when asked for ($5 <= count < $6).
_LIVE: Final = (
    "w.lease_until >= now() AND (w.suspected_at IS NULL "
    "OR w.suspected_at >= now() - $7 * interval '1 second')"
)
CLAIM: Final = f"""
WITH mark AS (
    UPDATE sagakit_workers w SET suspected_at = now()
    WHERE w.suspected_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid)
    RETURNING w.id
), live AS (
    SELECT w.id FROM sagakit_workers w WHERE {_LIVE}
), picked AS (
    SELECT s.id FROM sagakit_sagas s
    WHERE s.{ACTIVE}
      AND s.owner IS DISTINCT FROM $1
      AND ($3::text[] IS NULL OR s.saga_type = ANY($3::text[]))
      AND NOT (s.saga_type = ANY($4::text[]))
      AND s.recoveries + (s.owner IS NOT NULL)::int >= $5
      AND s.recoveries + (s.owner IS NOT NULL)::int < $6
      AND (s.owner IS NULL OR s.owner NOT IN (SELECT id FROM live))
      -- ready: new or woken (NULL) or due; a range of index sagakit_sagas_ready that ends at
      -- now (the subquery makes now one value, which an index condition can use)
      AND COALESCE(s.wake_at, 0) <= (SELECT {DB_NOW})
    ORDER BY COALESCE(s.wake_at, 0), s.created_at, s.id
    LIMIT $2
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE sagakit_sagas s
SET owner = $1,
    wake_at = NULL,  -- claimed because it was due: it waits no more
    recoveries = s.recoveries + (s.owner IS NOT NULL)::int,
    takeovers = s.takeovers + (s.owner IS NOT NULL)::int
FROM picked WHERE s.id = picked.id
RETURNING {", ".join("s." + c.strip() for c in SAGA_COLUMNS.split(","))}
"""

# Sagas of one type that live workers hold: the type's sagas in flight across the cluster.
IN_FLIGHT: Final = f"""
SELECT count(*) FROM sagakit_sagas s JOIN sagakit_workers w ON w.id = s.owner
WHERE s.{ACTIVE} AND s.saga_type = $1 AND {_LIVE.replace("$7", "$2")}
"""
TYPE_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext($1))"

# Active sagas this worker owns that it does not run (a claim whose reply was lost).
ADOPT: Final = f"""
SELECT {SAGA_COLUMNS} FROM sagakit_sagas
WHERE owner = $1 AND {ACTIVE} AND NOT (id = ANY($2::text[]))
ORDER BY created_at, id LIMIT $3
"""

HEARTBEAT: Final = """
INSERT INTO sagakit_workers (id, backend_pid, lease_until)
VALUES ($1, pg_backend_pid(), now() + $2 * interval '1 second')
ON CONFLICT (id) DO UPDATE
SET backend_pid = pg_backend_pid(), lease_until = now() + $2 * interval '1 second',
    suspected_at = NULL
"""
RELEASE: Final = "UPDATE sagakit_sagas SET owner = NULL WHERE owner = $1 AND id = ANY($2)"
RELEASE_ALL: Final = f"UPDATE sagakit_sagas SET owner = NULL WHERE owner = $1 AND {ACTIVE}"
FORGET_WORKER: Final = "DELETE FROM sagakit_workers WHERE id = $1"
UNOWN: Final = "UPDATE sagakit_sagas SET owner = NULL, wake_at = NULL WHERE id = $1"
NOTIFY: Final = "SELECT pg_notify($1, '')"
CLOCK: Final = f"SELECT {DB_NOW}"

# -- timers, signals, children -----------------------------------------------------------------

# Unload a saga: release it and make it claimable from $2 on; returns the seconds until then.
SUSPEND: Final = f"""
UPDATE sagakit_sagas SET owner = NULL, wake_at = $2 WHERE id = $1 AND owner = $3
RETURNING $2::float8 - {DB_NOW}
"""
SUSPEND_UNFENCED: Final = f"""
UPDATE sagakit_sagas SET wake_at = $2 WHERE id = $1
RETURNING $2::float8 - {DB_NOW}
"""
# Run as a statement of its own after SUSPEND, in the same READ COMMITTED transaction: it sees
# what was committed while SUSPEND waited for the row. A waited-for signal ($2 names, of which
# the saga consumed $3) beyond those consumed, or a child ($4) that ended, wakes the saga now
# (a child that needs attention has not ended: it waits for an operator).
WAKE_IF_READY: Final = """
UPDATE sagakit_sagas SET wake_at = NULL
WHERE id = $1 AND (
    EXISTS (
        SELECT 1 FROM unnest($2::text[], $3::bigint[]) AS w(name, consumed)
        WHERE (SELECT count(*) FROM sagakit_signals g WHERE g.saga_id = $1 AND g.name = w.name)
              > w.consumed
    )
    OR EXISTS (
        SELECT 1 FROM sagakit_sagas c
        WHERE c.id = ANY($4::text[])
          AND c.state IN ('completed', 'failed', 'cancelled')
    )
)
RETURNING id
"""
# Lock the row without a condition on wake_at, then clear it: a condition in the UPDATE's own
# WHERE would be judged on the row as it was before a SUSPEND that holds it commits, and skip
# the saga that SUSPEND is putting to sleep.
WAKE: Final = """
WITH target AS (SELECT id, wake_at FROM sagakit_sagas WHERE id = $1 FOR UPDATE)
UPDATE sagakit_sagas s SET wake_at = NULL FROM target t
WHERE s.id = t.id AND t.wake_at IS NOT NULL
RETURNING s.id
"""
NEXT_WAKE: Final = f"SELECT min(wake_at) FROM sagakit_sagas WHERE wake_at IS NOT NULL AND {ACTIVE}"
# A signal in one statement (one round trip in its transaction):
# - before: the saga's state (NULL: no such saga); an ended saga stores nothing;
# - stored: the new signal's id, NULL for a signal_id already stored. Its arrival is timed by
#   the database clock, which judges the timeouts of waits too;
# - after: the state once the saga was woken (NULL when nothing was stored). The wake has no
#   test of wake_at: it waits for a SUSPEND that holds the row, then clears the wake_at that
#   SUSPEND set, and its state is the one after any such wait (the caller rolls back if the
#   saga ended meanwhile);
# - a NOTIFY for the workers when a signal was stored (sent at commit, so not on rollback).
SEND_SIGNAL: Final = f"""
WITH before AS (SELECT state FROM sagakit_sagas WHERE id = $1),
stored AS (
    INSERT INTO sagakit_signals (saga_id, signal_id, name, payload, at)
    SELECT $1, $2, $3, $4, {DB_NOW} FROM before
    WHERE before.state NOT IN ('completed', 'failed', 'cancelled')
    ON CONFLICT (saga_id, signal_id) DO NOTHING
    RETURNING id
),
woken AS (
    UPDATE sagakit_sagas SET wake_at = NULL
    WHERE id = $1 AND EXISTS (SELECT 1 FROM stored)
    RETURNING state
),
told AS (SELECT pg_notify($5, '') FROM stored)
SELECT (SELECT state FROM before) AS before, (SELECT id FROM stored) AS stored,
       (SELECT state FROM woken) AS after, (SELECT count(*) FROM told) AS told
"""
SIGNALS: Final = f"SELECT {SIGNAL_COLUMNS} FROM sagakit_signals WHERE saga_id = $1 ORDER BY id"
SIGNALS_NAMED: Final = (
    f"SELECT {SIGNAL_COLUMNS} FROM sagakit_signals WHERE saga_id = $1 AND name = $2 ORDER BY id"
)
CANCEL_REQUESTS: Final = f"""
SELECT {", ".join("g." + c.strip() for c in SIGNAL_COLUMNS.split(","))}
FROM sagakit_signals g JOIN sagakit_sagas s ON s.id = g.saga_id
WHERE g.name = $1 AND g.id > $2 AND s.{ACTIVE}
ORDER BY g.id
"""

# -- the outbox --------------------------------------------------------------------------------

_OUTBOX_COLUMNS = "id, saga_id, message_id, topic, message, created_at, attempts"
OUTBOX_CLAIM: Final = f"""
UPDATE sagakit_outbox o SET available_at = {DB_NOW} + $2, attempts = o.attempts + 1
FROM (SELECT id FROM sagakit_outbox WHERE available_at <= {DB_NOW}
      ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) picked
WHERE o.id = picked.id
RETURNING {", ".join("o." + c for c in _OUTBOX_COLUMNS.split(", "))}
"""
OUTBOX_DONE: Final = "DELETE FROM sagakit_outbox WHERE id = ANY($1::bigint[])"
OUTBOX_STATS: Final = "SELECT count(*), min(created_at) FROM sagakit_outbox"
