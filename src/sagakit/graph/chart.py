"""The Mermaid flowchart model shared by both kinds of graph: nodes, groups, edges, escaping."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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
