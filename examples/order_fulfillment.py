"""Run 20 orders through the OrderFulfillment saga in this process and print what happened.

    python examples/order_fulfillment.py

The saga and its simulated services live in ``sagakit.examples.order_fulfillment``; this script
only starts orders on a temporary SQLite file and waits for them. ``sagakit demo`` runs the
same saga in a worker process that it kills mid-run.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from sagakit import Kind, SagaState
from sagakit.examples.order_fulfillment import SAGA_TYPE, create_app, sample_order


async def main(orders: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(
            f"sqlite:///{Path(tmp) / 'sagas.db'}",
            ledger_path=Path(tmp) / "ledger.db",
            decline_rate=0.2,
            shipment_failure_rate=0.15,
            glitch_rate=0.1,
            latency=0.02,
        )
        async with app:
            handles = [
                await app.start(SAGA_TYPE, order, idempotency_key=order.order_id)
                for order in map(sample_order, range(1, orders + 1))
            ]
            for handle in handles:
                info = await app.wait(handle.id)
                order_id = info.input["order_id"]
                if info.state is SagaState.COMPLETED:
                    payment = info.output["process_payment"]
                    print(f"{order_id}  completed     charged {payment['amount']}")
                    continue
                journal = await app.journal(handle.id)
                failed = next(e for e in journal if e.kind is Kind.STEP_FAILED)
                error = failed.error or {}
                undone = [e.step for e in journal if e.kind is Kind.COMPENSATION_COMPLETED]
                print(
                    f"{order_id}  {info.state:<12}  {failed.step} failed: {error.get('type')}: "
                    f"{error.get('message')}; compensated: {', '.join(map(str, undone))}"
                )


if __name__ == "__main__":
    asyncio.run(main())
