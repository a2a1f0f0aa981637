"""Examples shipped inside the package, so that ``sagakit demo`` works after ``pip install``.

- :mod:`sagakit.examples.order_fulfillment`: the order-fulfilment saga (reserve inventory,
  process payment, create shipment, send confirmation, each with its compensation) over
  simulated services that record their effects in a ledger.
- :mod:`sagakit.examples.approval`: a purchase approval that holds budget and waits days for an
  ``approve`` or ``reject`` signal.
- :mod:`sagakit.examples.remote_order`: the order-fulfilment saga with remote steps: four
  service processes and the orchestrator over RabbitMQ, NATS or Redis, in one command.
- :mod:`sagakit.examples.choreographed_order`: the same flow as services reacting to each
  other's events, followed by a Tracker.

:mod:`~sagakit.examples.remote_services` (the four services of ``remote_order``) and
:mod:`~sagakit.examples.runner` (processes, summaries and audits shared by both) support them.
"""
