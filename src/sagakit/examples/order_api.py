"""An order API on FastAPI: every ``POST /orders`` starts an OrderFulfillment saga, keyed by
the request's ``Idempotency-Key`` header, so a client that retries a request gets the same saga
back instead of a second order.

Routes:

- ``POST /orders``: a JSON order plus the ``Idempotency-Key`` header (required; 400 without
  it). 202 ``{"saga_id": ..., "created": true}`` for a new order; 200 with ``created: false``
  when the key had started a saga already (nothing new is started).
- ``GET /orders/{saga_id}``: the saga's ``state``, ``current_step``, ``output`` and ``error``
  (404 for an unknown id).

The sagakit App (and its files) is created only when the server starts (the FastAPI lifespan)
and closed when it stops; building the FastAPI app touches no disk. Run it (needs
``pip install 'sagakit[api]'``)::

    SAGAKIT_ORDER_API_DB=sqlite:///orders-api.db \\
        uvicorn sagakit.examples.order_api:app --host 127.0.0.1

    curl -i -X POST http://127.0.0.1:8000/orders \\
        -H 'Content-Type: application/json' -H 'Idempotency-Key: order-0001' \\
        -d '{"order_id": "order-0001", "customer_id": "customer-07",
             "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
             "payment_method": "visa-4242", "shipping_address": "1 Example Street"}'
    curl http://127.0.0.1:8000/orders/<saga_id>

The services' ledger sits next to a SQLite database (``orders-api-ledger.db``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sagakit import App, InvalidInput, SagaNotFound
from sagakit.examples.order_fulfillment import SAGA_TYPE, Item, Order, create_app

DEFAULT_DB = "sqlite:///orders-api.db"


class ItemIn(BaseModel):
    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    unit_price: Decimal = Field(ge=0)


class OrderIn(BaseModel):
    """The JSON body of ``POST /orders``: mirrors :class:`~.order_fulfillment.Order`."""

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    items: list[ItemIn] = Field(min_length=1)
    payment_method: str = Field(min_length=1)
    shipping_address: str = Field(min_length=1)

    def to_order(self) -> Order:
        return Order(
            order_id=self.order_id,
            customer_id=self.customer_id,
            items=[
                Item(sku=i.sku, quantity=i.quantity, unit_price=i.unit_price) for i in self.items
            ],
            payment_method=self.payment_method,
            shipping_address=self.shipping_address,
        )


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})


def _sagas(request: Request) -> App:
    sagas: App = request.app.state.sagas
    return sagas


def create_order_api(
    url: str,
    *,
    ledger_path: str | os.PathLike[str] | None = None,
    decline_rate: float = 0.1,
    shipment_failure_rate: float = 0.05,
    glitch_rate: float = 0.05,
) -> FastAPI:
    """The order API over the sagakit database at ``url``. Nothing is opened or written until
    the app's lifespan starts; the other arguments go to
    :func:`~sagakit.examples.order_fulfillment.create_app`."""

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        sagas = create_app(
            url,
            ledger_path=ledger_path,
            decline_rate=decline_rate,
            shipment_failure_rate=shipment_failure_rate,
            glitch_rate=glitch_rate,
        )
        await sagas.open()
        api.state.sagas = sagas
        try:
            yield
        finally:
            await sagas.close()

    api = FastAPI(title="sagakit order API", lifespan=lifespan)

    @api.post("/orders", status_code=202)
    async def place_order(
        order: OrderIn,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Any:
        """Start an OrderFulfillment saga for the order, once per ``Idempotency-Key``."""
        if not idempotency_key:
            return _error(
                400,
                "missing_idempotency_key",
                "the Idempotency-Key header is required: send the same key when you retry "
                "this order so that it is placed once",
            )
        try:
            handle = await _sagas(request).start(
                SAGA_TYPE, order.to_order(), idempotency_key=idempotency_key
            )
        except InvalidInput as exc:
            return _error(422, "invalid_order", str(exc))
        if not handle.created:
            response.status_code = 200
        return {"saga_id": handle.id, "created": handle.created}

    @api.get("/orders/{saga_id}")
    async def get_order(saga_id: str, request: Request) -> Any:
        """The order's saga: its state, and its output or error."""
        try:
            info = await _sagas(request).get(saga_id)
        except SagaNotFound:
            return _error(404, "not_found", f"no order saga with id {saga_id!r}")
        return jsonable_encoder(
            {
                "saga_id": info.id,
                "state": info.state.value,
                "current_step": info.current_step,
                "output": info.output,
                "error": info.error,
            },
            custom_encoder={Decimal: str},
        )

    return api


# Building the app reads one environment variable and touches no disk: the database and the
# ledger are opened when uvicorn runs the lifespan.
app = create_order_api(os.environ.get("SAGAKIT_ORDER_API_DB", DEFAULT_DB))
