"""Order fulfilment as a choreography: five service processes that react to each other's
events, with no orchestrator, and a tracker that follows each order's flow as a saga.

    python examples/choreographed_order.py --broker amqp://guest:guest@127.0.0.1:5672/
    python examples/choreographed_order.py --broker nats://127.0.0.1:4222 \\
        --without ShippingService --deadline 2      # the stalled flows are flagged

The example lives in ``sagakit.examples.choreographed_order``; ``python -m
sagakit.examples.choreographed_order`` is the same command (``--help`` lists the options).
"""

from __future__ import annotations

import sys

from sagakit.examples.choreographed_order import main

if __name__ == "__main__":
    sys.exit(main())
