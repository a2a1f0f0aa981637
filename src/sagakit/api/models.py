"""The request and response bodies of the REST API (pydantic models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sagakit.codec import is_unicode, text_problem
from sagakit.definition import MAX_DEADLINE, Parallel, Saga
from sagakit.handle import SagaInfo
from sagakit.journal import Entry, SagaState
from sagakit.timeline import TimelineRow

# JSON nested deeper than this could be stored but not sent back (pydantic stops at ~250).
MAX_DEPTH = 64


def storable_text(value: str) -> str:
    """``value`` if a database can store it as text, else a ValueError saying why."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def storable_json(value: Any) -> Any:
    """``value`` if its strings are valid Unicode and it nests at most MAX_DEPTH levels."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                raise ValueError("has a string that is not valid Unicode (an unpaired surrogate)")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise ValueError(f"is nested more than {MAX_DEPTH} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


# What the routes take as text and as JSON values, checked before anything is written.
Text = Annotated[str, AfterValidator(storable_text)]
Json = Annotated[Any, AfterValidator(storable_json)]


class _Strict(BaseModel):
    # An unknown field is a typo the caller wants to hear about, not something to drop.
    model_config = ConfigDict(extra="forbid")


class StartRequest(_Strict):
    type: Text = Field(min_length=1, description="The saga type, as registered in the App.")
    data: Json = Field(default=None, description="The saga's input (JSON).")
    idempotency_key: Text | None = Field(
        default=None, min_length=1, description="A second start with this key starts nothing."
    )
    deadline: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE,
        description="Seconds from now; overrides the definition's.",
    )


class SignalRequest(_Strict):
    name: Text = Field(min_length=1, description="The signal the saga waits for.")
    payload: Json = None
    signal_id: Text | None = Field(
        default=None, min_length=1, description="A repeat of this id is a no-op."
    )


class CancelRequest(_Strict):
    reason: Text = Field(default="", description="Why; recorded in the saga's journal.")


class ResolveRequest(_Strict):
    note: Text = Field(
        min_length=1, pattern=r"\S", description="What was done by hand; recorded in the journal."
    )


class ErrorOut(BaseModel):
    error: str = Field(description="The kind of error, e.g. SagaNotFound.")
    detail: str = Field(description="What went wrong and what to do next.")


# Declared on every route that takes input, in place of FastAPI's default 422 document
# (a list of pydantic errors): the error handlers answer every 422 as an ErrorOut.
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "The request is invalid; nothing was written."}
}


class SagaOut(BaseModel):
    id: str
    saga_type: str
    version: int
    state: SagaState
    idempotency_key: str | None
    current_step: str | None
    error: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    deadline: datetime | None
    parent_id: str | None
    waiting: bool
    wake_at: datetime | None

    @classmethod
    def of(cls, info: SagaInfo) -> SagaOut:
        return cls(**{name: getattr(info, name) for name in cls.model_fields})


class SagaDetailOut(SagaOut):
    input: Any = Field(description="The saga's input, decoded.")
    output: Any = Field(description="The saga's output once completed, decoded.")

    @classmethod
    def of(cls, info: SagaInfo) -> SagaDetailOut:
        return cls(**{name: getattr(info, name) for name in cls.model_fields})


class StartOut(SagaDetailOut):
    created: bool = Field(description="False when the idempotency key had started it already.")


class SagaPage(BaseModel):
    items: list[SagaOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="The offset of the next page; null at the end.")


class SignalOut(BaseModel):
    saga_id: str
    name: str
    sent: bool = Field(description="False when a signal with this signal_id was sent already.")


class EntryOut(BaseModel):
    index: int
    kind: str
    at: datetime
    seq: int | None
    step: str | None
    attempt: int | None
    payload: str | None = Field(description="Codec-encoded JSON text, as stored.")
    error: dict[str, Any] | None
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: Entry) -> EntryOut:
        return cls(
            index=e.index,
            kind=e.kind.value,
            at=datetime.fromtimestamp(e.at).astimezone(),
            seq=e.seq,
            step=e.step,
            attempt=e.attempt,
            payload=e.payload,
            error=e.error,
            data=e.data,
        )


class RowOut(BaseModel):
    at: datetime
    what: str
    attempt: int | None
    outcome: str
    took: float | None = Field(description="Seconds.")
    detail: str

    @classmethod
    def of(cls, r: TimelineRow) -> RowOut:
        return cls(
            at=datetime.fromtimestamp(r.at).astimezone(),
            what=r.what,
            attempt=r.attempt,
            outcome=r.outcome,
            took=r.took,
            detail=r.detail,
        )


class TimelineOut(BaseModel):
    saga_id: str
    state: SagaState
    rows: list[RowOut] = Field(description="Step and compensation attempts and saga events.")
    journal: list[EntryOut] = Field(description="The journal entries, oldest first.")


class DefinitionOut(BaseModel):
    type: str
    version: int = Field(description="The latest registered version; new sagas use it.")
    kind: str = Field(description="'declarative' (a list of steps) or 'code-first' (workflow).")
    steps: list[str] = Field(description="Step names of a declarative saga, in order.")
    deadline: float | None

    @classmethod
    def of(cls, saga: Saga) -> DefinitionOut:
        names: list[str] = []
        for item in saga.steps:
            if isinstance(item, Parallel):
                names.extend(s.name for s in item.steps)
            else:
                names.append(item.name)
        return cls(
            type=saga.name,
            version=saga.version,
            kind="declarative" if saga.steps else "code-first",
            steps=names,
            deadline=saga.deadline,
        )


class GraphOut(BaseModel):
    type: str
    version: int
    mermaid: str = Field(description="A Mermaid flowchart with its compensation edges.")
