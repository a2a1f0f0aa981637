"""``explore``: run a saga once per failure point and check what each run left behind.

Explore runs the sagas itself, in a scratch SQLite database of its own (a temporary directory),
with the App's definitions and middleware: the App's own database is never touched and the App
need not be open. Every point runs on its own clock, which skips the time that back-offs and
timers would wait, so a point whose compensation fails five times takes milliseconds. The
commands of remote steps are answered in-process by the services given to explore, without a
broker (:mod:`sagakit.testing.services`).

After each run, explore checks that:

1. the saga ended in the state the point calls for (see :mod:`sagakit.testing.points`);
2. compensations ran in reverse order of completion for exactly the completed steps that have
   one (the steps of one parallel group in any order among themselves), each once; a remote
   step that timed out counts as completed (it may have acted);
3. no action or compensation ran again after its outcome was durable in the journal;
4. a remote step's handler answered a second delivery of its command as it did the first;
5. the caller's invariant holds.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode, encode
from sagakit.definition import Saga
from sagakit.errors import UnknownSagaType
from sagakit.journal import Kind, SagaState, project
from sagakit.store.sqlite import SqliteStore
from sagakit.testing.checks import (
    check_compensations,
    check_invariant,
    check_owed,
    check_reruns,
    check_state,
)
from sagakit.testing.driver import Driver
from sagakit.testing.faults import Probe
from sagakit.testing.points import (
    REMOTE_KINDS,
    FailurePoint,
    Plan,
    PointKind,
    compensating,
    compensation_crashes,
    duplicate_compensations,
    plan_of,
    points_of,
    remote_compensations,
    select,
)
from sagakit.testing.report import ExploreReport, PointResult, PointRun, Status
from sagakit.testing.services import Services
from sagakit.testing.timeskip import SkipClock

if TYPE_CHECKING:
    from sagakit.app import App
    from sagakit.service import Service

# fn(run) -> anything, or an awaitable of it: see explore()'s ``invariant``.
Invariant = Callable[[PointRun], object]
_CLEAN = FailurePoint(
    id="clean", kind=PointKind.CLEAN, expected=SagaState.COMPLETED, description="no failure"
)


@dataclass(slots=True, kw_only=True)
class _Ran:
    """One point's run, before the checks that need every run (code-first compensations)."""

    point: FailurePoint
    probe: Probe
    seconds: float = 0.0
    run: PointRun | None = None
    problems: list[str] = field(default_factory=list)
    skipped: str = ""


async def explore(
    app: App,
    saga_type: str,
    data: Any = None,
    *,
    invariant: Invariant | None = None,
    only: str | Sequence[str] | None = None,
    expect: Mapping[str, SagaState | str] | None = None,
    signals: Mapping[str, Any] | None = None,
    services: Sequence[Service] = (),
    service_inboxes: bool = True,
    print_table: bool = True,
    point_timeout: float = 60.0,
) -> ExploreReport:
    """Run ``saga_type`` with input ``data`` once per failure point and check every run.

    Args:
        app: the App whose definition (latest version), middleware and clock are used. It is
            neither opened nor written to.
        saga_type: the saga to explore.
        data: its input, as ``app.start`` would take it.
        invariant: ``fn(run: PointRun)``, sync or async, called after each point's run with
            the saga's end state, journal, output and calls; it fails the point by raising
            (an ``assert`` will do) or returning a falsy value other than None. Use it to check
            your own services' state: every point runs a new saga with a new id, so
            idempotency keys (``"{saga_id}/{step}"``) tell the points apart.
        only: run only the point (or points) with these ids, e.g. ``"crash@7"``. The clean
            run that finds the points always runs first.
        expect: end states that differ from explore's expectation, by point id (for a
            workflow that handles a failure itself, say).
        signals: payloads by signal name: when the saga waits for one of these, explore sends
            it (once per wait). A wait for another signal runs into its timeout, or, without
            one, leaves the point stuck (reported as failed).
        services: the services whose handlers answer the saga's remote steps, in-process and
            without a broker (each :class:`~sagakit.service.Service` is neither started nor
            connected). Their effects are your state: check them in ``invariant``. Remote
            steps add the points ``timeout@``, ``noreply@``, ``dup@`` and ``dup@undo:`` (see
            :mod:`sagakit.testing.points`).
        service_inboxes: run the handlers of a service made with ``inbox=URL`` in
            transactions of that database, as the service would (``ctx.db`` is their
            connection); False, or a service on the default inbox: ``ctx.db`` is None.
        print_table: print the report's table when done.
        point_timeout: real seconds one point may take before it counts as stuck.

    Returns:
        The report: ``report.ok``, ``report.failures``, ``str(report)`` (the table) and
        ``report.raise_for_failures()``.

    Raises:
        UnknownSagaType: ``app`` has no definition of ``saga_type``.
        NotSerializable: ``data`` or a signal's payload cannot be stored as JSON.
        ConfigurationError: an id in ``only`` or ``expect`` is not a point of this saga;
            the saga sends a command that none of ``services`` handles (a workflow's, only
            once it sends it: the point that ran into it fails); two services handle one.
        StoreError: a service's inbox database cannot be opened.
    """
    saga = app.definition(saga_type)
    if saga is None:
        raise UnknownSagaType(saga_type, app.saga_types)
    payload = encode(data, what=f"the input of saga {saga_type!r}")
    sent = {k: encode(v, what=f"the payload of signal {k!r}") for k, v in (signals or {}).items()}
    answering = Services(services, inboxes=service_inboxes)
    answering.check(saga)
    with tempfile.TemporaryDirectory(prefix="sagakit-explore-") as tmp:
        store = SqliteStore(str(Path(tmp) / "explore.db"), durability="normal")
        executor = ThreadPoolExecutor(8, thread_name_prefix="sagakit-explore")
        try:
            await answering.open(executor)
            await store.open()
            driver = Driver(
                store=store,
                saga=saga,
                middleware=app.middleware,
                executor=executor,
                resolve=app.definition,
                signals=sent,
                services=answering,
            )
            session = _Session(
                driver,
                saga,
                payload,
                invariant=invariant,
                timeout=point_timeout,
                start=app.clock.now(),
            )
            report = await session.explore(only, expect)
        finally:
            await store.close()
            await answering.close()
            executor.shutdown(wait=False, cancel_futures=True)
    if print_table:
        print(report.table())
    return report


class _Session:
    """One exploration: the clean run, the points, the checks."""

    def __init__(
        self,
        driver: Driver,
        saga: Saga,
        payload: str,
        *,
        invariant: Invariant | None,
        timeout: float,
        start: float,
    ) -> None:
        self.driver = driver
        self.saga = saga
        self.payload = payload
        self.invariant = invariant
        self.timeout = timeout
        self.start = start  # every point's clock starts at the App's now

    async def explore(
        self, only: str | Sequence[str] | None, expect: Mapping[str, SagaState | str] | None
    ) -> ExploreReport:
        clean = await self._point(_CLEAN)
        if clean.run is None:  # no plan without a clean run that came to rest
            result = PointResult(
                point=_CLEAN, status=Status.FAILED, state=None, problems=tuple(clean.problems)
            )
            return ExploreReport(saga_type=self.saga.name, results=(result,))
        plan, points, done = await self._discover(clean)
        ran = []
        for point in select(points, only, expect):
            found = done.get(point.id)
            if found is not None:
                found.point = point  # already run; only the expectation may have moved
                ran.append(found)
            else:
                ran.append(await self._point(point))
        compensable = self._compensable(plan, [*done.values(), *ran])
        results = tuple(_verdict(r, compensable) for r in ran)
        return ExploreReport(saga_type=self.saga.name, results=results)

    async def _discover(self, clean: _Ran) -> tuple[Plan, list[FailurePoint], dict[str, _Ran]]:
        """The points, from the clean run and from the run that compensates the most (which
        numbers the writes on the way back); and the runs made on the way, by point id."""
        assert clean.run is not None
        plan = plan_of(
            self.saga, clean.probe.calls, clean.run.journal, clean.probe.writes, clean.run.state
        )
        points = points_of(plan)
        done = {clean.point.id: clean}
        base = compensating(points)
        if base is None:
            return plan, points, done
        back = done[base.id] = await self._point(base)
        points += compensation_crashes(base, back.probe.writes)
        journal = () if back.run is None else back.run.journal
        if plan.compensable is None and back.run is not None:
            # Only a run shows which of a workflow's steps have a compensation.
            undone = {e.step for e in journal if e.kind is Kind.COMPENSATION_STARTED}
            points = [p for p in points if p.kind is not PointKind.UNDO or p.step in undone]
        points = duplicate_compensations(points, remote_compensations(self.saga, journal))
        return plan, points, done

    def _compensable(self, plan: Plan, ran: Sequence[_Ran]) -> Callable[[str], bool]:
        """Which steps have a compensation: declared; for a workflow, those whose
        compensation started in any run (a child saga's included)."""
        known = plan.compensable
        if known is None:
            known = frozenset(
                e.step or ""
                for r in ran
                if r.run is not None
                for e in r.run.journal
                if e.kind is Kind.COMPENSATION_STARTED
            )
        return known.__contains__

    async def _point(self, point: FailurePoint) -> _Ran:
        probe = Probe(point.id, faults=point.faults(), crash_at=point.checkpoint)
        clock = SkipClock(self.start)
        ran = _Ran(point=point, probe=probe)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                record = await self.driver.start(self.payload, clock)
                drive = await self.driver.drive(record, probe, clock)
        except TimeoutError:
            ran.problems.append(f"the saga did not come to rest within {self.timeout} s")
            return ran
        except Exception as exc:
            ran.problems.append(f"the run raised {type(exc).__name__}: {exc}")
            return ran
        finally:
            probe.kill()  # whatever a stuck run left behind stays dead
            ran.seconds = time.perf_counter() - began
        ran.skipped = _not_fired(point, probe, declared=bool(self.saga.steps))
        if drive.state is None:
            ran.problems.append(f"the saga did not come to rest: {drive.stuck}")
            return ran
        p = project(drive.journal)
        ran.run = PointRun(
            point=point,
            saga_id=record.id,
            data=decode(record.input, self.saga.input_type),
            state=drive.state,
            journal=tuple(drive.journal),
            output=decode(p.output),
            error=p.error,
            crashes=drive.crashes,
            calls=tuple(probe.calls),
        )
        if not ran.skipped:
            ran.problems += await check_invariant(self.invariant, ran.run)
        return ran


def _not_fired(point: FailurePoint, probe: Probe, *, declared: bool) -> str:
    """Why the point's fault never struck ("" if it did)."""
    injected = [c for c in probe.calls if c.injected]
    if point.kind is PointKind.CRASH and not probe.crashes:
        return f"the run made only {len(probe.writes)} journal writes"
    if point.kind is PointKind.ERROR and not injected:
        return f"{point.step} was never called"
    if point.kind is PointKind.UNDO and not any(c.compensation for c in injected):
        if declared:  # a declared compensation must run: the checks will say why it did not
            return ""
        return f"no compensation of {point.step} ran; it may have none"
    if point.kind in REMOTE_KINDS and point.faults()[0] not in probe.struck:
        if point.trigger is None:
            return f"no command of {point.step} was sent"
        if declared:
            return ""
        return f"no compensation of {point.step} was sent; it may have none"
    return ""


def _verdict(ran: _Ran, compensable: Callable[[str], bool]) -> PointResult:
    point, run = ran.point, ran.run
    if ran.skipped:
        state = None if run is None else run.state
        return PointResult(
            point=point,
            status=Status.SKIPPED,
            state=state,
            note=ran.skipped,
            run=run,
            seconds=ran.seconds,
        )
    problems: list[str] = []
    if run is not None:
        journal = list(run.journal)
        problems += check_state(run.state, point.expected)
        problems += check_compensations(journal, run.state, compensable)
        problems += check_owed(journal, compensable)
        problems += check_reruns(ran.probe.calls, ran.probe.commits)
        problems += dict.fromkeys(ran.probe.problems)  # once each, however often it came
    problems += ran.problems
    status = Status.FAILED if problems else Status.OK
    return PointResult(
        point=point,
        status=status,
        state=None if run is None else run.state,
        problems=tuple(problems),
        run=run,
        seconds=ran.seconds,
    )
