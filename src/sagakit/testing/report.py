"""What explore reports: a result per failure point, and the table that shows them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from sagakit.errors import SagakitError
from sagakit.journal import Entry, Kind, SagaState
from sagakit.testing.faults import CallRecord
from sagakit.testing.points import FailurePoint


class Status(enum.StrEnum):
    OK = "ok"
    FAILED = "FAILED"
    SKIPPED = "skipped"  # the fault never fired: the run never got where it strikes


@dataclass(frozen=True, slots=True, kw_only=True)
class PointRun:
    """One failure point's saga after it came to rest: what the invariant receives.

    Attributes:
        point: the failure point.
        saga_id: the saga explore ran for it (in explore's own scratch database).
        data: the saga's input, as the steps received it.
        state: the end state, as the journal says.
        journal: the saga's journal entries.
        output: the saga's output (decoded JSON) if it completed.
        error: the saga's last error, as stored.
        crashes: how often the process died and recovered on the way.
        calls: every action and compensation call that reached the step bodies, in order
            (injected failures included, marked ``injected``).
    """

    point: FailurePoint
    saga_id: str
    data: Any
    state: SagaState
    journal: tuple[Entry, ...] = field(repr=False)
    output: Any
    error: dict[str, Any] | None
    crashes: int
    calls: tuple[CallRecord, ...] = field(repr=False)

    @property
    def completed_steps(self) -> list[str]:
        """Steps whose action completed, in order of completion."""
        return [e.step or "" for e in self.journal if e.kind is Kind.STEP_COMPLETED]

    @property
    def compensated_steps(self) -> list[str]:
        """Steps whose compensation completed, in order."""
        return [e.step or "" for e in self.journal if e.kind is Kind.COMPENSATION_COMPLETED]


@dataclass(frozen=True, slots=True, kw_only=True)
class PointResult:
    """The verdict on one failure point.

    Attributes:
        point: the failure point.
        status: ``ok``, ``FAILED``, or ``skipped`` (the fault never fired).
        state: the end state reached (None if the saga never came to rest).
        problems: what went wrong, one sentence each.
        note: something worth knowing that is no problem (crashes survived, why skipped).
        run: the run the checks looked at, if the saga came to rest.
        seconds: real time the point took.
    """

    point: FailurePoint
    status: Status
    state: SagaState | None
    problems: tuple[str, ...] = ()
    note: str = ""
    run: PointRun | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.point.id

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAILED


class ExplorationFailed(SagakitError, AssertionError):
    """Some failure point of an exploration broke a check; the message is the whole table.
    An AssertionError too, so pytest reports it as a failed test."""

    def __init__(self, report: ExploreReport) -> None:
        self.report = report
        super().__init__(report.table())


@dataclass(frozen=True, slots=True, kw_only=True)
class ExploreReport:
    """Every failure point's result, in the order they ran.

    ``str(report)`` is the table; ``report.raise_for_failures()`` raises it as
    :class:`ExplorationFailed` if any point failed.
    """

    saga_type: str
    results: tuple[PointResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[PointResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.results]

    def __getitem__(self, point_id: str) -> PointResult:
        for r in self.results:
            if r.id == point_id:
                return r
        raise KeyError(f"no failure point {point_id!r}; the points are {', '.join(self.ids)}")

    def raise_for_failures(self) -> None:
        """Raise :class:`ExplorationFailed` (the table as its message) if a point failed."""
        if not self.ok:
            raise ExplorationFailed(self)

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The results as a text table, with each failed point's problems under it."""
        failed = len(self.failures)
        skipped = sum(r.status is Status.SKIPPED for r in self.results)
        n = len(self.results)
        summary = f"{n} failure point{'s' * (n != 1)}: {n - failed - skipped} ok"
        summary += f", {failed} FAILED" if failed else ""
        summary += f", {skipped} skipped" if skipped else ""
        head = ("point", "injected", "expected", "got", "result")
        rows = [head, *(_row(r) for r in self.results)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = [f"explore {self.saga_type}: {summary}"]
        for row, r in zip(rows, (None, *self.results), strict=True):
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
            if r is not None and not r.ok:
                lines += [f"      - {p}" for p in r.problems]
        if failed:
            first = self.failures[0].id
            lines.append(f"re-run one point alone: explore(..., only={first!r})")
        return "\n".join(lines)


def _row(r: PointResult) -> tuple[str, str, str, str, str]:
    got = "-" if r.state is None else r.state.value
    result = r.status.value + (f" ({r.note})" if r.note else "")
    return (r.id, r.point.description, r.point.expected.value, got, result)
