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
import enum
import itertools
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagakit.definition import Parallel, Saga, Step, StepKind
from sagakit.errors import ConfigurationError
from sagakit.journal import Entry, Kind
from sagakit.store import SqliteStore
from sagakit.store.base import SagaRecord

if TYPE_CHECKING:
    from sagakit.app import App

START, COMPLETED, FAILED = "start", "completed", "failed"
ATTENTION, CANCELLED = "needs_attention", "cancelled"
_TERMINALS = {
    START: ("start", None),
    COMPLETED: ("completed", "ok"),
    FAILED: ("failed (compensated)", "bad"),
    ATTENTION: ("needs_attention", "bad"),
    CANCELLED: ("cancelled (compensated)", "bad"),
}
_CLASSES = {
    "ok": "fill:#e6f4ea,stroke:#1e7e34",
    "bad": "fill:#fdecea,stroke:#c62828",
    "undo": "fill:#fff4e5,stroke:#b26a00,stroke-dasharray: 4 3",
    "pivot": "fill:#e8eaf6,stroke:#283593,stroke-width:2px",
}
# Characters that are safe inside a quoted Mermaid label as they are. Everything else becomes
# an entity code: '#' starts one, '"' ends the label, '<' may start HTML, '\n' and '\\n' break
# lines, '$$' starts maths and '%%' a comment; escaping all the rest too costs nothing.
_PLAIN = frozenset(" _-.,:/+=@'!?()")


class _Shape(enum.Enum):
    """Node shapes, as the brackets around a quoted label."""

    TERMINAL = ('(["', '"])')
    STEP = ('["', '"]')
    PIVOT = ('{{"', '"}}')
    UNDO = ('("', '")')
    TIMER = ('(("', '"))')
    SIGNAL = ('>"', '"]')
    CHILD = ('[["', '"]]')


def escape(text: str) -> str:
    """``text`` made safe to put between the quotes of a Mermaid label."""
    out = []
    for ch in text:
        if ch.isalnum() or ch in _PLAIN:
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        else:
            out.append(f"#{ord(ch)};")
    return "".join(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Node:
    id: str
    label: str
    shape: _Shape
    css: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Group:
    id: str
    title: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Edge:
    src: str
    dst: str
    dashed: bool = False
    label: str = ""


@dataclass(slots=True, kw_only=True)
class _Chart:
    """Nodes, subgraphs and edges, rendered as one ``flowchart TD``."""

    comment: str
    nodes: dict[str, _Node] = field(default_factory=dict)
    groups: list[_Group] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)

    def add(self, node: _Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def edge(self, src: str, dst: str, *, dashed: bool = False, label: str = "") -> None:
        for end in (src, dst):
            if end in _TERMINALS and end not in self.nodes:
                name, css = _TERMINALS[end]
                self.add(_Node(id=end, label=name, shape=_Shape.TERMINAL, css=css))
        self.edges.append(_Edge(src=src, dst=dst, dashed=dashed, label=label))

    def render(self) -> str:
        lines = ["flowchart TD", f"    %% {escape(self.comment)}"]
        grouped = {m for g in self.groups for m in g.members}
        lines += [f"    {_node(n)}" for n in self.nodes.values() if n.id not in grouped]
        for g in self.groups:
            lines.append(f'    subgraph {g.id}["{escape(g.title)}"]')
            lines += [f"        {_node(self.nodes[m])}" for m in g.members]
            lines.append("    end")
        for e in self.edges:
            arrow = "-.->" if e.dashed else "-->"
            label = f'|"{escape(e.label)}"|' if e.label else ""
            lines.append(f"    {e.src} {arrow}{label} {e.dst}")
        used: dict[str, list[str]] = {}
        for n in self.nodes.values():
            if n.css is not None:
                used.setdefault(n.css, []).append(n.id)
        for css, ids in used.items():
            lines.append(f"    classDef {css} {_CLASSES[css]}")
            lines.append(f"    class {','.join(ids)} {css}")
        return "\n".join(lines) + "\n"


def _node(n: _Node) -> str:
    opening, closing = n.shape.value
    return f"{n.id}{opening}{escape(n.label)}{closing}"


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


# -- code-first sagas, from their journals -----------------------------------------------------

_Key = tuple[str, str]  # (what, name): ("step", "reserve#2"), ("undo", "reserve"), ...

_ENDS = {
    Kind.SAGA_COMPLETED: COMPLETED,
    Kind.SAGA_FAILED: FAILED,
    Kind.OPERATOR_RESOLVED: FAILED,
    Kind.SAGA_CANCELLED: CANCELLED,
    Kind.SAGA_PARKED: ATTENTION,
    Kind.COMPENSATION_EXHAUSTED: ATTENTION,
}


@dataclass(slots=True, kw_only=True)
class _Run:
    """What one journal did, in order: forward positions (a list of keys that ran at once),
    the steps that failed, compensation positions, and how it ended (None: unfinished)."""

    forward: list[list[_Key]] = field(default_factory=list)
    failed: dict[_Key, str] = field(default_factory=dict)  # key -> "fails" / "times out"
    undo: list[list[_Key]] = field(default_factory=list)
    end: str | None = None
    cancelled: bool = False
    labels: dict[_Key, tuple[str, _Shape]] = field(default_factory=dict)


def _forward_key(e: Entry, counts: Counter[str]) -> tuple[_Key, str, _Shape]:
    data = e.data or {}
    if e.kind is Kind.TIMER_STARTED:
        counts["sleep"] += 1
        name = _nth("sleep", counts["sleep"])
        until = data.get("until")
        label = "sleep" if until is None else f"sleep {_seconds(float(until) - e.at)}"
        return ("timer", name), label, _Shape.TIMER
    if e.kind is Kind.SIGNAL_WAITING:
        signal = str(data.get("name", "?"))
        counts[f"signal:{signal}"] += 1
        seconds = data.get("timeout")
        timeout = "" if data.get("until") is None else " (with timeout)"
        if seconds is not None:
            timeout = f" (timeout {_seconds(float(seconds))})"
        key = ("signal", _nth(signal, counts[f"signal:{signal}"]))
        return key, f"wait for signal {signal}{timeout}", _Shape.SIGNAL
    name = e.step or "?"
    if "child" in data:
        child = f"child saga {data.get('type', '?')}"
        label = child if name == data.get("type") else f"{name}: {child}"
        return ("child", name), label, _Shape.CHILD
    return ("step", name), name, _Shape.STEP


def _nth(name: str, n: int) -> str:
    return name if n == 1 else f"{name}#{n}"


def _seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size and s % size < 1:
            return f"{s / size:.0f} {unit}"
    return f"{s:.3g} s" if s < 1000 else f"{s:.0f} s"


def _command(e: Entry) -> object:
    """What a forward entry belongs to: a step's retries and re-runs share it."""
    return e.seq if e.seq is not None else e.step


_FORWARD = frozenset({Kind.STEP_STARTED, Kind.TIMER_STARTED, Kind.SIGNAL_WAITING})


class _Reader:
    """Folds one journal, entry by entry, into a :class:`_Run`."""

    def __init__(self) -> None:
        self.run = _Run()
        self.counts: Counter[str] = Counter()
        self.keys: dict[object, _Key] = {}  # command -> its node key
        self.group: object = None  # the parallel group of the last forward position
        self.undoing: set[_Key] = set()  # compensations started and not finished

    def feed(self, e: Entry) -> None:
        if e.kind in _FORWARD:
            self._forward(e)
        elif e.kind in (Kind.STEP_FAILED, Kind.SIGNAL_TIMED_OUT):
            key = self.keys.get(_command(e))
            if key is not None:
                self.run.failed[key] = "fails" if e.kind is Kind.STEP_FAILED else "times out"
        elif e.kind is Kind.COMPENSATION_STARTED:
            self._compensation(("undo", e.step or "?"))
        elif e.kind in (Kind.COMPENSATION_COMPLETED, Kind.COMPENSATION_EXHAUSTED):
            self.undoing.discard(("undo", e.step or "?"))
        if e.kind is Kind.CANCEL_REQUESTED:
            self.run.cancelled = True
        elif e.kind is Kind.OPERATOR_RETRY:
            self.run.end = None  # the parked saga goes on
        self.run.end = _ENDS.get(e.kind, self.run.end)

    def _forward(self, e: Entry) -> None:
        if _command(e) in self.keys:
            return
        key, label, shape = _forward_key(e, self.counts)
        self.keys[_command(e)] = key
        self.run.labels.setdefault(key, (label, shape))
        group = (e.data or {}).get("group")
        if group is not None and group == self.group and self.run.forward:
            self.run.forward[-1].append(key)
        else:
            self.run.forward.append([key])
        self.group = group

    def _compensation(self, key: _Key) -> None:
        if key not in self.run.labels:
            self.run.labels[key] = (f"undo {key[1]}", _Shape.UNDO)
            # Started while another is still running: the two run at once.
            if self.undoing and self.run.undo:
                self.run.undo[-1].append(key)
            else:
                self.run.undo.append([key])
        self.undoing.add(key)


def mermaid_from_journals(saga_type: str, journals: Sequence[Sequence[Entry]]) -> str:
    """The flowchart of a code-first saga: the union of what its recorded runs did.

    Each run's forward path (steps, durable sleeps, signal waits, child sagas; steps of one
    ``ctx.parallel`` as a subgraph), the failure that ended it and the compensations it ran
    are drawn; an edge is labelled with the number of runs that took it. Branches no recorded
    run took do not appear.

    Args:
        saga_type: the saga type, for the chart's comment.
        journals: one journal per run, each a list of its entries.
    """
    runs = []
    for journal in journals:
        reader = _Reader()
        for e in sorted(journal, key=lambda e: e.index):
            reader.feed(e)
        runs.append(reader.run)
    count = "1 recorded run" if len(runs) == 1 else f"{len(runs)} recorded runs"
    chart = _Chart(comment=f"saga {saga_type}: drawn from {count}")
    chart.add(_Node(id=START, label="start", shape=_Shape.TERMINAL))
    ids = _place_nodes(chart, runs)
    units = {**ids, **_place_groups(chart, [r.forward for r in runs], ids, "g", "in parallel"),
             **_place_groups(chart, [r.undo for r in runs], ids, "ug", "undo at once")}  # fmt: skip
    counts: Counter[_Edge] = Counter()
    for run in runs:
        counts.update(_run_edges(run, units))
    for edge, n in counts.items():
        taken = "1 run" if n == 1 else f"{n} runs"
        label = f"{edge.label}, {taken}" if edge.label else taken
        chart.edge(edge.src, edge.dst, dashed=edge.dashed, label=label)
    return chart.render()


def _place_nodes(chart: _Chart, runs: Sequence[_Run]) -> dict[_Key, str]:
    """A node for every key, numbered in order of first appearance."""
    ids: dict[_Key, str] = {}
    for run in runs:
        for key in (k for position in (*run.forward, *run.undo) for k in position):
            if key not in ids:
                label, shape = run.labels[key]
                ids[key] = f"{'u' if shape is _Shape.UNDO else 'n'}{len(ids)}"
                css = "undo" if shape is _Shape.UNDO else None
                chart.add(_Node(id=ids[key], label=label, shape=shape, css=css))
    return ids


def _place_groups(
    chart: _Chart, paths: Sequence[list[list[_Key]]], ids: dict[_Key, str], prefix: str, title: str
) -> dict[_Key, str]:
    """A subgraph for each set of keys seen running at once, in any run: key -> subgraph id.

    Sets that share a key are merged (a run that stopped in the middle of a group saw only
    part of it), so that every node is in at most one subgraph.
    """
    parent: dict[_Key, _Key] = {}

    def root(k: _Key) -> _Key:
        while parent.get(k, k) != k:
            k = parent[k]
        return k

    positions = [p for path in paths for p in path]
    for position in positions:
        for k in position[1:]:
            a, b = root(position[0]), root(k)
            if a != b:
                parent[b] = a
    members: dict[_Key, list[_Key]] = {}
    for k in (k for p in positions for k in p):
        found = members.setdefault(root(k), [])
        if k not in found:
            found.append(k)
    units: dict[_Key, str] = {}
    for keys in (m for m in members.values() if len(m) > 1):
        group_id = _subgraph(chart, f"{prefix}{len(chart.groups)}", title, [ids[k] for k in keys])
        units.update(dict.fromkeys(keys, group_id))
    return units


def _run_edges(run: _Run, units: dict[_Key, str]) -> list[_Edge]:
    """The edges one run took, each once."""
    path = [START, *(units[p[0]] for p in run.forward)]
    failed = ["", *(next((run.failed[k] for k in p if k in run.failed), "") for p in run.forward)]
    edges = [
        _Edge(src=a, dst=b, dashed=bool(why), label=why)
        for (a, b), why in zip(itertools.pairwise(path), failed, strict=False)
    ]
    last = path[-1]
    why = failed[-1] or ("cancelled" if run.cancelled else "")
    undo = [units[p[0]] for p in run.undo]
    if undo:
        edges.append(_Edge(src=last, dst=undo[0], dashed=True, label=why))
        edges += [_Edge(src=a, dst=b, dashed=True) for a, b in itertools.pairwise(undo)]
        last, why = undo[-1], ""
    if run.end is not None:
        dashed = bool(undo or why) or run.end != COMPLETED
        edges.append(_Edge(src=last, dst=run.end, dashed=dashed, label=why))
    return [e for e in dict.fromkeys(edges) if e.src != e.dst]


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
        raise ConfigurationError(_unknown(app, saga_type, version))
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


def _unknown(app: App, saga_type: str, version: int | None) -> str:
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
