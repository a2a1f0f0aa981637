"""The inbox's SQL, as named queries per dialect. Every value is a bound parameter.

The table is the only thing the inbox creates, so it can live in sagakit's own database (next
to the saga tables, which it never touches) or in a database of the service's own::

    sagakit_inbox (message_id text PRIMARY KEY, handled_at, reply text)

``reply`` is the reply envelope's JSON, ``''`` for a command that asked for no reply, and
``NULL`` only inside the transaction that is handling the message (never committed).
"""

from __future__ import annotations

from typing import Final

# -- SQLite ------------------------------------------------------------------------------------

SQLITE_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS sagakit_inbox ("
    "message_id TEXT PRIMARY KEY, handled_at REAL NOT NULL, reply TEXT)"
)
SQLITE_SEEN: Final = "SELECT reply FROM sagakit_inbox WHERE message_id = ?"
# Inserted first in the handling transaction: a concurrent duplicate finds the row (or waits
# for the write lock) and is told "seen" instead of running the effect again.
SQLITE_CLAIM: Final = (
    "INSERT INTO sagakit_inbox (message_id, handled_at) VALUES (?, ?) "
    "ON CONFLICT (message_id) DO NOTHING"
)
SQLITE_RECORD: Final = "UPDATE sagakit_inbox SET reply = ?, handled_at = ? WHERE message_id = ?"

# -- PostgreSQL --------------------------------------------------------------------------------

# The same advisory lock key sagakit's store takes while migrating a schema (``hashtext`` of
# ``sagakit_wake_<schema>``): concurrent first starts of a service and of sagakit's workers then
# create the schema one after the other instead of racing on ``CREATE SCHEMA IF NOT EXISTS``.
PG_SETUP_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext($1))"
# Checked first: CREATE ... IF NOT EXISTS needs the CREATE privilege even when the object
# exists, and a service's database user may have only what it needs to use the inbox.
PG_SCHEMA_EXISTS: Final = "SELECT true FROM pg_namespace WHERE nspname = $1"
PG_CREATE_SCHEMA: Final = 'CREATE SCHEMA IF NOT EXISTS "{schema}"'  # a validated identifier
PG_SET_SEARCH_PATH: Final = 'SET LOCAL search_path TO "{schema}"'
PG_TABLE_EXISTS: Final = "SELECT to_regclass('sagakit_inbox') IS NOT NULL"
PG_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS sagakit_inbox ("
    "message_id text PRIMARY KEY, handled_at timestamptz NOT NULL DEFAULT now(), reply text)"
)
PG_SEEN: Final = "SELECT reply FROM sagakit_inbox WHERE message_id = $1"
# A duplicate inserting while the first delivery's transaction is open waits for it, then
# inserts nothing (committed) or goes on as the first (rolled back).
PG_CLAIM: Final = (
    "INSERT INTO sagakit_inbox (message_id) VALUES ($1) "
    "ON CONFLICT (message_id) DO NOTHING RETURNING true"
)
PG_RECORD: Final = "UPDATE sagakit_inbox SET reply = $2, handled_at = now() WHERE message_id = $1"
PG_SAVEPOINT: Final = "SAVEPOINT sagakit_handler"
PG_ROLLBACK_SAVEPOINT: Final = "ROLLBACK TO SAVEPOINT sagakit_handler"
PG_RELEASE_SAVEPOINT: Final = "RELEASE SAVEPOINT sagakit_handler"

SQLITE_SAVEPOINT: Final = "SAVEPOINT sagakit_handler"
SQLITE_ROLLBACK_SAVEPOINT: Final = "ROLLBACK TO SAVEPOINT sagakit_handler"
SQLITE_RELEASE_SAVEPOINT: Final = "RELEASE SAVEPOINT sagakit_handler"
