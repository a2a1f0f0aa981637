"""Helpers shared by the engine integration tests: journal/projection checks and a call log."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sagakit import App, Entry, Kind, SagaInfo
from sagakit.codec import decode
from sagakit.journal import Projection, project


@dataclass(frozen=True, slots=True)
class Checked:
    """A saga's journal, its row (as ``app.get`` reports it) and the journal's projection."""

    entries: list[Entry]
    info: SagaInfo
    projection: Projection

    def kinds(self) -> list[Kind]:
        return [e.kind for e in self.entries]

    def of(self, *kinds: Kind) -> list[Entry]:
        return [e for e in self.entries if e.kind in kinds]

    def steps(self, *kinds: Kind) -> list[tuple[Kind, str | None, int | None]]:
        """(kind, step, attempt) of the entries of ``kinds``, in journal order."""
        return [(e.kind, e.step, e.attempt) for e in self.of(*kinds)]


async def checked(app: App, saga_id: str) -> Checked:
    """Read the journal and the row and assert that the row is the journal's projection."""
    entries = await app.journal(saga_id)
    info = await app.get(saga_id)
    p = project(entries)
    assert [e.index for e in entries] == list(range(len(entries))), "journal has gaps"
    assert all(e.saga_id == saga_id for e in entries)
    assert entries[0].kind is Kind.SAGA_STARTED
    assert p.state == info.state, (p.state, info.state)
    assert p.current_step == info.current_step
    assert decode(p.output) == info.output
    assert p.error == info.error
    assert info.updated_at.timestamp() >= info.created_at.timestamp()
    return Checked(entries=entries, info=info, projection=p)


@dataclass
class CallLog:
    """Records what step bodies and compensations saw, in call order (thread-safe)."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, **seen: Any) -> None:
        with self.lock:
            self.calls.append((name, seen))

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.calls]

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for n, s in self.calls if n == name]


@pytest.fixture
def check() -> Callable[[App, str], Awaitable[Checked]]:
    """``await check(app, saga_id)``: the saga's journal, row and projection, checked to agree."""
    return checked


@pytest.fixture
def calls() -> CallLog:
    return CallLog()
