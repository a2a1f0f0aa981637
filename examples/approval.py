"""Three purchase requests through the PurchaseApproval saga: one approved, one rejected, and
one nobody answers, whose three days pass in a blink on a virtual clock.

    python examples/approval.py

The saga lives in ``sagakit.examples.approval``. To answer requests yourself, run a worker on
a database and send signals from another terminal::

    sagakit worker --app sagakit.examples.approval:app
    sagakit list --db sqlite:///approvals.db
    sagakit signal <saga id> approve '{"by": "ann"}' --db sqlite:///approvals.db
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

from sagakit import App, SagaState, VirtualClock
from sagakit.examples.approval import SAGA_TYPE, budget_of, create_app, sample_request


async def until_waiting(app: App, saga_id: str) -> None:
    """Until the saga is unloaded, waiting for its signal (the state is in the database)."""
    while not (await app.get(saga_id)).waiting:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def main() -> None:
    clock = VirtualClock()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'approvals.db'}"
        app = create_app(url, clock=clock, poll_interval=0.05)
        budget = budget_of(app)
        async with app:
            requests = [sample_request(n) for n in (1, 2, 3)]
            handles = [
                await app.start(SAGA_TYPE, r, idempotency_key=r.request_id) for r in requests
            ]
            for h in handles:
                await until_waiting(app, h.id)
            for r in requests:
                held = budget.held(r.request_id)
                print(f"{r.request_id}  waiting for approval; budget held: {held}")
            await app.signal(handles[0].id, "approve", {"by": "ann"})
            await app.signal(handles[1].id, "reject", {"by": "bob", "comment": "use the spare"})
            await asyncio.sleep(0.5)
            print("... three days later ...")
            await clock.advance(timedelta(days=3))
            for r, h in zip(requests, handles, strict=True):
                info = await app.wait(h.id)
                if info.state is SagaState.COMPLETED:
                    out = info.output
                    what = f"approved by {out['approved_by']}: {out['purchase_order']}"
                else:
                    what = f"{(info.error or {}).get('message')}"
                held = budget.held(r.request_id)
                print(f"{r.request_id}  {info.state:<9}  {what}; budget held: {held}")


if __name__ == "__main__":
    asyncio.run(main())
