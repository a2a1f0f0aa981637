"""The faults explore injects, and what it watches while one failure point runs.

An error is raised in place of a step's action or compensation by :class:`Injector`, the
innermost middleware. A remote step's send passes through the middleware too, but its faults
(a failed reply, a lost command or reply, a second delivery) are applied where explore plays
the broker (:mod:`sagakit.testing.services`), which also records its calls: the injector lets
the send through untouched. A crash happens at a journal write:
:class:`FaultyStore` wraps the store, holds ``append_soon`` entries back until the next durable
write (so that a crash loses them, as it would lose a real process's queue) and, at the chosen
write, drops what is queued and raises :class:`SimulatedCrash` through the run. All share a
:class:`Probe`, which numbers every call and every commit on one counter, so that a call can be
placed after or before a commit.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagakit.definition import StepKind
from sagakit.journal import Entry
from sagakit.middleware import Middleware, Proceed, StepCall
from sagakit.store.base import Store

# Which life of the simulated process a task belongs to; tasks the engine spawns inherit it,
# so a straggler of a crashed run (a parallel branch, a back-off that wakes late) stays dead.
LIFE: contextvars.ContextVar[int | None] = contextvars.ContextVar("sagakit_life", default=None)


class InjectedFault(Exception):
    """The error explore raises instead of calling an action or compensation.

    Attributes:
        point: the failure point's id.
        step: the step whose call failed.
        attempt: the attempt that failed.
        compensation: True if the compensation was called, False for the action.
    """

    def __init__(self, point: str, step: str, attempt: int, *, compensation: bool) -> None:
        self.point = point
        self.step = step
        self.attempt = attempt
        self.compensation = compensation
        what = "compensation of step" if compensation else "step"
        super().__init__(
            f"{what} {step!r} failed (attempt {attempt}): injected by sagakit.testing at {point}"
        )


class SimulatedCrash(BaseException):
    """Unwinds a run the way a killed process stops. A BaseException, so that neither the
    engine nor the workflow's own ``except Exception`` handles it."""


def is_crash(exc: BaseException) -> bool:
    """Whether ``exc`` is a simulated crash, alone or among a group's (parallel branches)."""
    if isinstance(exc, SimulatedCrash):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(SimulatedCrash) is not None


class Effect(enum.StrEnum):
    """What a fault does to the calls it hits."""

    ERROR = "error"  # fails instead of running (a remote command: a failed reply, unhandled)
    DROP = "drop"  # remote only: the command is lost, the step times out
    LOSE_REPLY = "lose_reply"  # remote only: the handler runs, its reply is lost
    DUPLICATE = "duplicate"  # remote only: the command is handled twice


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """A fault to inject into every attempt of ``step``'s action (or compensation), or only
    the first when ``first_attempt_only``: an error unless ``effect`` says otherwise."""

    step: str
    compensation: bool = False
    first_attempt_only: bool = False
    effect: Effect = Effect.ERROR

    def matches(self, step: str, *, compensation: bool, attempt: int) -> bool:
        if step != self.step or compensation != self.compensation:
            return False
        return attempt == 1 or not self.first_attempt_only

    def hits(self, call: StepCall) -> bool:
        """Whether this fault fails ``call``, a local step's call through the middleware."""
        return self.effect is Effect.ERROR and self.matches(
            call.step, compensation=call.compensation, attempt=call.attempt
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One action or compensation call that reached the innermost middleware, or one
    command of a remote step that explore delivered to its service's handler.

    ``tick`` orders it among the other calls and the commits of the same run; ``injected``
    says the call failed with an :class:`InjectedFault` instead of running (for a command:
    its service replied failed, or the command was lost, without the handler running);
    ``life`` counts the crashes before it. ``remote`` marks a command handled by a service
    given to explore, ``duplicate`` its second delivery (at a ``dup@`` point).
    """

    tick: int
    step: str
    compensation: bool
    attempt: int
    kind: StepKind
    injected: bool
    life: int
    remote: bool = False
    duplicate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Write:
    """One journal write of a run: ``how`` is ``queued`` (``append_soon``), ``durable``
    (``append``) or ``suspend`` (the saga unloads, committing what is queued)."""

    n: int
    how: str
    entries: tuple[Entry, ...]

    def describe(self) -> str:
        what = ", ".join(
            f"{e.kind.value} {e.step}" if e.step else e.kind.value for e in self.entries
        )
        if self.how == "suspend":
            return "unload to wait"
        return what if self.how == "durable" else f"{what} (queued)"


class Probe:
    """What one failure point injects and observes, shared by its middleware and store."""

    def __init__(
        self, point: str, *, faults: Sequence[Fault] = (), crash_at: int | None = None
    ) -> None:
        self.point = point
        self.faults = tuple(faults)
        self.crash_at = crash_at
        self.calls: list[CallRecord] = []
        self.struck: list[Fault] = []  # the faults that hit a call, once per hit
        self.problems: list[str] = []  # found while the run went on (a reply that differs)
        self.writes: list[Write] = []
        self.commits: list[tuple[Entry, int]] = []  # each entry with the tick it became durable
        self.in_flight = 0
        self.life = 0
        self.crashes = 0
        self._ticks = itertools.count(1)

    def tick(self) -> int:
        return next(self._ticks)

    def alive(self) -> bool:
        life = LIFE.get()
        return life is None or life == self.life

    def fault(self, step: str, *, compensation: bool, attempt: int) -> Fault | None:
        """The fault that hits this attempt of a step's action or compensation, if any."""
        return next(
            (f for f in self.faults if f.matches(step, compensation=compensation, attempt=attempt)),
            None,
        )

    def kill(self) -> None:
        """End this life of the process: whatever is left of its run can no longer act."""
        self.life += 1

    def write(self, how: str, entries: Sequence[Entry]) -> bool:
        """Count a journal write; return True if the process dies at it (and end its life)."""
        n = len(self.writes) + 1
        self.writes.append(Write(n=n, how=how, entries=tuple(entries)))
        if n != self.crash_at:
            return False
        self.crashes += 1
        self.kill()
        return True

    def committed(self, entries: Sequence[Entry]) -> None:
        tick = self.tick()
        self.commits.extend((e, tick) for e in entries)


class Tracker(Middleware):
    """The outermost middleware: counts calls in flight, so the driver never skips time that
    a running step body may be using (its timeout, say)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        self.probe.in_flight += 1
        try:
            return await proceed()
        finally:
            self.probe.in_flight -= 1


class Injector(Middleware):
    """The innermost middleware: records every call that reaches the step's body, and fails
    the ones a fault of the probe hits."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        probe = self.probe
        if not probe.alive():
            raise SimulatedCrash(f"{probe.point}: a call from a crashed run")
        if call.remote:  # faulted and recorded where explore delivers the command
            return await proceed()
        hit = [f for f in probe.faults if f.hits(call)]
        probe.struck += hit
        injected = bool(hit)
        probe.calls.append(
            CallRecord(
                tick=probe.tick(),
                step=call.step,
                compensation=call.compensation,
                attempt=call.attempt,
                kind=call.kind,
                injected=injected,
                life=probe.life,
            )
        )
        if injected:
            raise InjectedFault(
                probe.point, call.step, call.attempt, compensation=call.compensation
            )
        return await proceed()


class FaultyStore:
    """A store that counts journal writes, commits queued entries only with the next durable
    write, and crashes at the probe's crash point.

    It forwards every other part of the :class:`~sagakit.store.base.Store` protocol to the
    wrapped store unchanged (``__getattr__``), so methods the protocol gains later pass through.
    """

    def __init__(self, inner: Store, probe: Probe) -> None:
        self.inner = inner
        self.probe = probe
        self._queued: dict[str, list[Entry]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None:
        self._write(saga_id, "queued", entries)
        self._queued.setdefault(saga_id, []).extend(entries)

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None:
        self._write(saga_id, "durable", entries)
        await self._commit(saga_id, entries)

    async def suspend(
        self, saga_id: str, wake_at: float, signals: Mapping[str, int], children: Sequence[str]
    ) -> None:
        self._write(saga_id, "suspend", ())
        await self._commit(saga_id, ())
        await self.inner.suspend(saga_id, wake_at, signals, children)

    async def flush(self, saga_id: str) -> None:
        """Commit what a finished run left queued (a real store's writer would)."""
        await self._commit(saga_id, ())

    def _write(self, saga_id: str, how: str, entries: Sequence[Entry]) -> None:
        if not self.probe.alive():  # a straggler of a crashed run: it must touch nothing
            raise SimulatedCrash(f"{self.probe.point}: a write from a crashed run")
        if self.probe.write(how, entries):
            self._queued.pop(saga_id, None)  # lost with the process
            raise SimulatedCrash(f"{self.probe.point}: the process died at this journal write")

    async def _commit(self, saga_id: str, entries: Sequence[Entry]) -> None:
        batch = [*self._queued.pop(saga_id, ()), *entries]
        if batch:
            await self.inner.append(saga_id, batch)
            self.probe.committed(batch)
