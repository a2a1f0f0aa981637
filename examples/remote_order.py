"""Order fulfilment over a message broker: four service processes and an orchestrator.

    python examples/remote_order.py --broker amqp://guest:guest@127.0.0.1:5672/
    python examples/remote_order.py --broker nats://127.0.0.1:4222 --orders 50
    python examples/remote_order.py --broker redis://127.0.0.1:6379/0 --db postgresql://...

It starts InventoryService, PaymentService, ShippingService, NotificationService and an
orchestrator worker as subprocesses, runs the orders, prints a summary checked against the
services' ledger, and stops everything. The example lives in
``sagakit.examples.remote_order``; ``python -m sagakit.examples.remote_order`` is the same
command (``--help`` lists the options).
"""

from __future__ import annotations

import sys

from sagakit.examples.remote_order import main

if __name__ == "__main__":
    sys.exit(main())
