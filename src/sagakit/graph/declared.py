"""Declarative sagas drawn from their step list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagakit.definition import Parallel, Saga, Step, StepKind
from sagakit.errors import ConfigurationError
from sagakit.graph.chart import (
    ATTENTION,
    COMPLETED,
    FAILED,
    START,
    _Chart,
    _Group,
    _Node,
    _Shape,
)

# -- declarative sagas -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Unit:
    """One item of a step list: where forward edges go, and what its failure enters."""

    forward: str
    undo: str | None  # its compensations (a subgraph if several run at once)
    group: bool
    compensates: bool  # a failure here compensates the earlier steps
    parks: bool  # a failure here (for good) parks the saga


def mermaid(saga: Saga) -> str:
    """The flowchart of a declarative saga: steps in order, parallel groups as subgraphs,
    and the compensation chain a failure at each step runs, ending in ``failed``.

    A failure in a parallel group first undoes the group's completed steps (at once), then the
    steps before it. Steps after the pivot are retried, never compensated: one that fails for
    good leads to ``needs_attention``.

    Raises:
        ConfigurationError: ``saga`` is code-first; draw it with :func:`mermaid_from_journals`.
    """
    if not saga.steps:
        raise ConfigurationError(
            f"saga {saga.name!r} is code-first: its steps exist only when it runs; "
            "draw it from recorded runs with mermaid_from_journals()"
        )
    chart = _Chart(comment=f"saga {saga.name} v{saga.version}: declared steps")
    chart.add(_Node(id=START, label="start", shape=_Shape.TERMINAL))
    units = _declared_units(chart, saga.steps)
    previous = START
    for unit in units:
        chart.edge(previous, unit.forward)
        previous = unit.forward
    chart.edge(previous, COMPLETED)
    owed: str | None = None  # the compensation a failure of the current item starts with
    for unit in units:
        entry = unit.undo if unit.group and unit.undo else owed
        if unit.compensates:
            chart.edge(unit.forward, entry or FAILED, dashed=True, label="fails")
        if unit.parks:
            chart.edge(unit.forward, ATTENTION, dashed=True, label="fails for good")
        if unit.undo is not None:
            chart.edge(unit.undo, owed or FAILED, dashed=True)
            owed = unit.undo
    return chart.render()


def _declared_units(chart: _Chart, items: Sequence[Step | Parallel]) -> list[_Unit]:
    units, n = [], 0
    for j, item in enumerate(items):
        steps = item.steps if isinstance(item, Parallel) else (item,)
        ids, undos = [], []
        for s in steps:
            pivot = s.kind is StepKind.PIVOT
            label = s.name if s.kind is StepKind.COMPENSATABLE else f"{s.name} ({s.kind})"
            shape = _Shape.PIVOT if pivot else _Shape.STEP
            ids.append(chart.add(_Node(id=f"s{n}", label=label, shape=shape,
                                       css="pivot" if pivot else None)))  # fmt: skip
            if s.compensate is not None:
                undo = _Node(id=f"u{n}", label=f"undo {s.name}", shape=_Shape.UNDO, css="undo")
                undos.append(chart.add(undo))
            n += 1
        forward = _subgraph(chart, f"g{j}", "in parallel", ids)
        kinds = {s.kind for s in steps}
        units.append(_Unit(
            forward=forward,
            undo=_subgraph(chart, f"ug{j}", "undo at once", undos) if undos else None,
            group=len(ids) > 1,
            compensates=bool(kinds - {StepKind.RETRIABLE}),
            parks=StepKind.RETRIABLE in kinds,
        ))  # fmt: skip
    return units


def _subgraph(chart: _Chart, group_id: str, title: str, members: Sequence[str]) -> str:
    """The one member, or a subgraph of several; edges go to what this returns."""
    if len(members) == 1:
        return members[0]
    chart.groups.append(_Group(id=group_id, title=title, members=tuple(members)))
    return group_id
