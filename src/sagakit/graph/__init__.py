"""Saga definitions drawn as Mermaid flowcharts, for ``sagakit graph TYPE``.

A declarative saga is drawn from its step list (:func:`mermaid`). A code-first saga has no
steps until its workflow runs, so it is drawn from the journals of recorded runs
(:func:`mermaid_from_journals`): the union of the paths they took, each edge with the number
of runs that took it. Forward edges are solid; failure and compensation edges are dashed.

Node ids are derived from positions, never from names, and every label is escaped, so any
step name gives valid Mermaid. Everything here is pure except :func:`graph_for`, which reads
definitions and journals through an App.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from sagakit.definition import Saga
from sagakit.errors import ConfigurationError
from sagakit.graph.chart import escape
from sagakit.graph.declared import mermaid
from sagakit.graph.recorded import mermaid_from_journals
from sagakit.journal import Entry
from sagakit.store import SqliteStore
from sagakit.store.base import SagaRecord

if TYPE_CHECKING:
    from sagakit.app import App

__all__ = ["escape", "graph_for", "mermaid", "mermaid_from_journals", "unknown_type_message"]

# -- from an App -------------------------------------------------------------------------------


async def graph_for(app: App, saga_type: str, *, version: int | None = None, runs: int = 50) -> str:
    """The Mermaid flowchart of ``saga_type`` as ``app`` registers it.

    A declarative definition is drawn from its steps, without touching the database; a
    code-first one from the journals of its ``runs`` most recent sagas of that version.

    Raises:
        ConfigurationError: the type (or version) is not registered, or a code-first type has
            no recorded run yet.
    """
    saga = app.definition(saga_type, version)
    if saga is None:
        raise ConfigurationError(unknown_type_message(app, saga_type, version))
    if saga.steps:
        return mermaid(saga)
    journals = await _recorded_journals(app, saga, runs)
    if not journals:
        raise ConfigurationError(
            f"saga {saga_type!r} v{saga.version} is code-first, so its graph is drawn from "
            f"recorded runs, and {app.store.location} has none of that version yet; "
            "run one first"
        )
    return mermaid_from_journals(saga_type, journals)


def unknown_type_message(app: App, saga_type: str, version: int | None) -> str:
    """Why ``saga_type`` (at ``version``) has no definition in ``app``, with what it has."""
    latest = app.definition(saga_type)
    if latest is not None:
        return (f"saga {saga_type!r} has no version {version} registered; "
                f"the latest is {latest.version}")  # fmt: skip
    known = ", ".join(app.saga_types) or "none"
    return f"unknown saga type {saga_type!r}; the App registers: {known}"


async def _recorded_journals(app: App, saga: Saga, runs: int) -> list[list[Entry]]:
    store = app.store
    if isinstance(store, SqliteStore) and not await asyncio.to_thread(os.path.exists, store.path):
        return []  # opening it would create an empty database just to find nothing in it
    await app.open_for_reading()
    found: list[SagaRecord] = []
    offset, page = 0, max(runs, 100)
    while len(found) < runs:
        records = await app.store.list_sagas(saga_type=saga.name, limit=page, offset=offset)
        found += [r for r in records if r.version == saga.version]
        if len(records) < page:
            break
        offset += page
    # Oldest first, so that nodes are numbered in the order the code first took them.
    return [await app.store.journal(r.id) for r in reversed(found[:runs])]
