"""Code-first sagas drawn from the journals of their recorded runs."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sagakit.graph.chart import (
    ATTENTION,
    CANCELLED,
    COMPLETED,
    FAILED,
    START,
    _Chart,
    _Edge,
    _Node,
    _Shape,
)
from sagakit.graph.declared import _subgraph
from sagakit.journal import Entry, Kind

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
