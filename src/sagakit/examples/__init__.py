"""Examples shipped inside the package, so that ``sagakit demo`` works after ``pip install``.

- :mod:`sagakit.examples.order_fulfillment`: the order-fulfilment saga (reserve inventory,
  process payment, create shipment, send confirmation, each with its compensation) over
  simulated services that record their effects in a ledger.
"""
