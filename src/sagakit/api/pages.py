"""The dashboard's HTML, rendered on the server. Pure: no I/O.

Every value that comes from a saga (ids, types, payloads, errors, step names, notes) goes
through :func:`esc`, so a payload holding ``<script>`` shows as text. The pages load nothing
from elsewhere: no framework, no CDN, one inline script (with the response's CSP nonce) that
refreshes the saga list.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlencode

from sagakit.definition import Parallel, Saga, Step
from sagakit.handle import SagaInfo
from sagakit.journal import Entry, Kind, SagaState
from sagakit.timeline import TimelineRow

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:8px 16px}header a{color:#fff}
main{padding:16px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eceff1}.counts span{display:inline-block;margin:0 12px 8px 0}
.flash{padding:8px;border:1px solid #1e7e34;background:#e6f4ea;margin-bottom:12px}
.flash.error{border-color:#c62828;background:#fdecea}
.flow{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:8px 0}
.box{border:2px solid #90a4ae;border-radius:6px;padding:6px 10px;background:#fff}
.group{display:flex;flex-direction:column;gap:4px;border:1px dashed #90a4ae;padding:4px}
.completed{background:#e6f4ea;border-color:#1e7e34}.failed{background:#fdecea;border-color:#c62828}
.compensated{background:#fff4e5;border-color:#b26a00}.running,.retrying,.compensating{
background:#e3f2fd;border-color:#1565c0}.compensation-failed{background:#c62828;color:#fff}
.state-needs_attention{color:#c62828;font-weight:bold}.state-completed{color:#1e7e34}
.state-failed,.state-cancelled{color:#b26a00}.paging{margin:8px 0}.paging a{margin-left:12px}
header form{float:right;margin:0}pre{background:#fff;border:1px solid #ddd;
padding:6px;overflow:auto;max-height:240px}form.action{display:inline-block;margin:0 12px 8px 0;
border:1px solid #ddd;padding:6px;background:#fff}
"""

# A step's state on the saga page, from the last journal entry about it.
_STEP_STATE = {
    Kind.STEP_STARTED: "running",
    Kind.STEP_RETRYING: "retrying",
    Kind.STEP_COMPLETED: "completed",
    Kind.STEP_FAILED: "failed",
    Kind.COMPENSATION_STARTED: "compensating",
    Kind.COMPENSATION_RETRYING: "compensating",
    Kind.COMPENSATION_COMPLETED: "compensated",
    Kind.COMPENSATION_EXHAUSTED: "compensation-failed",
}
_ACTIVE = {SagaState.STARTED, SagaState.RUNNING, SagaState.COMPENSATING}


def esc(value: object) -> str:
    """``value`` as text that is safe in HTML content and in quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def saga_url(saga_id: str, action: str = "") -> str:
    return f"/sagas/{quote(saga_id, safe='')}" + (f"/{action}" if action else "")


def page(title: str, body: str, *, nonce: str, script: str = "", csrf: str | None = None) -> str:
    """A whole page; with the session's ``csrf`` token its header has a log-out button."""
    tag = f'<script nonce="{esc(nonce)}">{script}</script>' if script else ""
    logout = (
        ""
        if csrf is None
        else '<form method=post action="/logout" id="logout">'
        f'<input type=hidden name=csrf value="{esc(csrf)}"><button type=submit>log out</button>'
        "</form>"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · sagakit</title><style>{_STYLE}</style></head><body>"
        f'<header>{logout}<a href="/">sagakit</a> · '
        f"{esc(title)}</header><main>{body}</main>{tag}</body></html>"
    )


def login_page(*, nonce: str, failed: bool) -> str:
    problem = '<div class="flash error">Wrong token.</div>' if failed else ""
    body = (
        f"{problem}<form method=post action=/login>"
        "<label>API token <input type=password name=token autocomplete=off autofocus></label> "
        "<button type=submit>Log in</button></form>"
    )
    return page("log in", body, nonce=nonce)


# -- the saga list ------------------------------------------------------------------------------

# Re-fetches the list every 2 s and swaps it in; plain fetch, no framework. The page's own URL
# carries its filters and offset, so the refresh shows the same page.
LIVE_SCRIPT = """
setInterval(async () => {
  const url = new URL(location.href); url.searchParams.set("fragment", "1");
  try {
    const r = await fetch(url, {credentials: "same-origin", redirect: "manual"});
    if (r.ok) document.getElementById("live").innerHTML = await r.text();
    else if (r.type === "opaqueredirect") location.reload();  // the session ended: log in
  } catch (e) {}
}, 2000);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Where:
    """The list's filters and page size, which every link between its pages keeps."""

    state: str | None
    saga_type: str | None
    limit: int
    default: int  # the page size a link leaves out

    def url(self, offset: int) -> str:
        """The list page at ``offset`` under these filters."""
        query = {"state": self.state or "", "type": self.saga_type or ""}
        if self.limit != self.default:
            query["limit"] = str(self.limit)
        if offset > 0:
            query["offset"] = str(offset)
        kept = urlencode({k: v for k, v in query.items() if v})
        return f"/?{kept}" if kept else "/"


def paging(where: Where, *, offset: int, shown: int, more: bool, total: int) -> str:
    """The list's position ("showing 51-100 of 230") and links to the newer and older pages.
    (``total`` is counted apart from the page, so sagas started in between may make the
    page's rows run past it: the larger is shown.)"""
    last = offset + shown
    if shown == 0 and offset > 0:
        text = f"nothing from saga {offset + 1} on"
    else:
        count = max(total, last)
        text = f"showing {offset + 1}-{last} of {count}" if shown else f"showing 0 of {count}"
    links = ""
    if offset > 0:
        links += f'<a id="newer" href="{esc(where.url(max(offset - where.limit, 0)))}">← newer</a>'
    if more:
        links += f'<a id="older" href="{esc(where.url(offset + where.limit))}">older →</a>'
    return f'<div class="paging"><span id="showing">{esc(text)}</span>{links}</div>'


def list_fragment(
    counts: dict[str, int], sagas: Sequence[SagaInfo], paging: str, *, saga_type: str | None
) -> str:
    """The live part of the list page: counts by state (of ``saga_type`` if filtered on), the
    page's rows and the paging links."""
    shown = " ".join(
        f'<span class="state-{esc(s.value)}">{esc(s.value)}: '
        f'<b data-state="{esc(s.value)}">{counts.get(s.value, 0)}</b></span>'
        for s in SagaState
    )
    rows = "".join(
        f'<tr data-saga="{esc(i.id)}"><td><a href="{esc(saga_url(i.id))}">{esc(i.id)}</a></td>'
        f"<td>{esc(i.saga_type)} v{i.version}</td>"
        f'<td class="state-{esc(i.state.value)}">{esc(i.state.value)}</td>'
        f"<td>{esc(i.current_step or '')}</td><td>{_when(i.created_at)}</td>"
        f"<td>{_when(i.updated_at)}</td></tr>"
        for i in sagas
    )
    empty = "" if sagas else '<tr><td colspan="6">No saga matches.</td></tr>'
    scope = f"{esc(saga_type)}, by state: " if saga_type else ""
    return (
        f'<div class="counts">{scope}{shown}</div>{paging}<table id="sagas"><thead><tr>'
        "<th>id</th><th>type</th><th>state</th><th>current step</th><th>created</th>"
        f"<th>updated</th></tr></thead><tbody>{rows}{empty}</tbody></table>"
    )


def list_page(fragment: str, *, types: Iterable[str], where: Where, nonce: str, csrf: str) -> str:
    def options(values: Iterable[str], chosen: str | None) -> str:
        return "<option value=''>any</option>" + "".join(
            f'<option value="{esc(v)}"{" selected" if v == chosen else ""}>{esc(v)}</option>'
            for v in values
        )

    # Filtering starts again at the newest saga, with the same page size.
    size = (
        f'<input type=hidden name=limit value="{where.limit}">'
        if where.limit != where.default
        else ""
    )
    filters = (
        '<form method=get action="/" id="filters">'
        f"<label>state <select name=state>{options((s.value for s in SagaState), where.state)}"
        "</select></label> "
        f"<label>type <select name=type>{options(types, where.saga_type)}</select></label> "
        f"{size}<button type=submit>Filter</button></form>"
    )
    body = f'{filters}<div id="live">{fragment}</div>'
    return page("sagas", body, nonce=nonce, script=LIVE_SCRIPT, csrf=csrf)


# -- one saga -----------------------------------------------------------------------------------


def step_states(entries: Sequence[Entry]) -> dict[str, str]:
    """Each step's state, from the last journal entry about it (in journal order)."""
    states: dict[str, str] = {}
    for e in entries:
        if e.step is not None and e.kind in _STEP_STATE:
            states[e.step] = _STEP_STATE[e.kind]
    return states


def _box(name: str, states: dict[str, str]) -> str:
    state = states.get(name, "pending")
    return (
        f'<div class="box {esc(state)}" data-step="{esc(name)}" data-state="{esc(state)}">'
        f"{esc(name)}<br><small>{esc(state)}</small></div>"
    )


def flow(definition: Saga | None, entries: Sequence[Entry]) -> str:
    """The definition's steps as boxes, coloured by state; a code-first saga's steps are the ones
    its journal recorded, in the order it first ran them."""
    states = step_states(entries)
    parts: list[str] = []
    if definition is not None and definition.steps:
        for item in definition.steps:
            if isinstance(item, Parallel):
                inner = "".join(_box(s.name, states) for s in item.steps)
                parts.append(f'<div class="group">{inner}</div>')
            elif isinstance(item, Step):
                parts.append(_box(item.name, states))
    else:
        parts = [_box(name, states) for name in states]
    if not parts:
        return "<p>No step ran yet.</p>"
    return '<div class="flow">' + " → ".join(parts) + "</div>"


def _json(raw: str | None) -> str:
    if raw is None:
        return "<i>none</i>"
    try:
        text = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        text = raw
    return f"<pre>{esc(text)}</pre>"


def _when(at: datetime) -> str:
    return esc(at.strftime("%Y-%m-%d %H:%M:%S"))


def timeline_table(rows: Sequence[TimelineRow], start: float) -> str:
    body = "".join(
        f'<tr class="{esc(r.outcome.replace(" ", "-"))}"><td>+{r.at - start:.3f} s</td>'
        f"<td>{esc(r.what)}</td><td>{'' if r.attempt is None else r.attempt}</td>"
        f"<td>{esc(r.outcome)}</td>"
        f"<td>{'' if r.took is None else f'{r.took * 1000:.1f} ms'}</td>"
        f"<td>{esc(r.detail)}</td></tr>"
        for r in rows
    )
    return (
        '<table id="timeline"><thead><tr><th>at</th><th>what</th><th>attempt</th>'
        f"<th>outcome</th><th>took</th><th>detail</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _form(info: SagaInfo, action: str, label: str, csrf: str, fields: str = "") -> str:
    return (
        f'<form class="action" method=post action="{esc(saga_url(info.id, action))}">'
        f'<input type=hidden name=csrf value="{esc(csrf)}">{fields}'
        f'<button type=submit name=do value="{esc(action)}">{esc(label)}</button></form>'
    )


def actions(info: SagaInfo, csrf: str) -> str:
    forms = []
    if info.state is SagaState.NEEDS_ATTENTION:
        forms.append(_form(info, "retry", "retry", csrf))
        note = "<label>note <input name=note required></label> "
        forms.append(_form(info, "resolve", "resolve", csrf, note))
    if info.state in _ACTIVE:
        forms.append(_form(info, "cancel", "cancel", csrf, "<label>reason <input name=reason>"
                                                           "</label> "))  # fmt: skip
        # A signal id per rendered form: a double submit is stored once.
        signal = (
            f'<input type=hidden name=signal_id value="{uuid.uuid4().hex}">'
            "<label>signal <input name=name required></label> "
            "<label>payload (JSON) <input name=payload value=null></label> "
        )
        forms.append(_form(info, "signal", "send signal", csrf, signal))
    return "".join(forms) or "<p>No action applies in this state.</p>"


def saga_page(
    info: SagaInfo,
    *,
    rows: Sequence[TimelineRow],
    start: float,
    steps: str,
    mermaid: str,
    csrf: str,
    flash: tuple[str, bool] | None,
    nonce: str,
) -> str:
    note = ""
    if flash is not None:
        text, ok = flash
        note = f'<div class="flash{"" if ok else " error"}" id="flash">{esc(text)}</div>'
    error = _json(json.dumps(info.error)) if info.error else "<i>none</i>"
    parent = (
        f'<a href="{esc(saga_url(info.parent_id))}">{esc(info.parent_id)}</a>'
        if info.parent_id
        else "—"
    )
    summary = (
        "<table><tbody>"
        f"<tr><th>id</th><td>{esc(info.id)}</td></tr>"
        f"<tr><th>type</th><td>{esc(info.saga_type)} v{info.version}</td></tr>"
        f'<tr><th>state</th><td id="state" class="state-{esc(info.state.value)}">'
        f"{esc(info.state.value)}{' (waiting)' if info.waiting else ''}</td></tr>"
        f"<tr><th>current step</th><td>{esc(info.current_step or '')}</td></tr>"
        f"<tr><th>idempotency key</th><td>{esc(info.idempotency_key or '')}</td></tr>"
        f"<tr><th>parent</th><td>{parent}</td></tr>"
        f"<tr><th>created / updated</th><td>{_when(info.created_at)} / "
        f"{_when(info.updated_at)}</td></tr>"
        f"<tr><th>input</th><td>{_json(info.raw_input)}</td></tr>"
        f"<tr><th>output</th><td>{_json(info.raw_output)}</td></tr>"
        f"<tr><th>error</th><td>{error}</td></tr></tbody></table>"
    )
    graph = (
        f"<details><summary>Mermaid source</summary><pre>{esc(mermaid)}</pre></details>"
        if mermaid
        else ""
    )
    body = (
        f"{note}<h2>Actions</h2>{actions(info, csrf)}<h2>Summary</h2>{summary}"
        f"<h2>Steps</h2>{steps}{graph}<h2>Timeline</h2>{timeline_table(rows, start)}"
    )
    return page(f"saga {info.id}", body, nonce=nonce, csrf=csrf)
