"""Errors as JSON ``{"error": kind, "detail": message}`` with the status code each deserves."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from sagakit.errors import (
    ConfigurationError,
    InvalidInput,
    InvalidSagaState,
    NotSerializable,
    SagakitError,
    SagaNotFound,
    StoreUnavailable,
    UnknownSagaType,
)

# First match wins; anything else sagakit raises is a 500 with its message.
_STATUS: tuple[tuple[type[SagakitError], int], ...] = (
    (SagaNotFound, 404),
    (InvalidSagaState, 409),
    (UnknownSagaType, 422),
    (InvalidInput, 422),
    (NotSerializable, 422),
    (ConfigurationError, 422),
    (StoreUnavailable, 503),
)


class ApiError(Exception):
    """An error the routes raise themselves, with its status code and kind."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        self.status_code, self.error, self.detail = status_code, error, detail
        super().__init__(detail)


def error_response(status_code: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code)


def install_error_handlers(api: FastAPI) -> None:
    """Answer sagakit errors, validation errors and HTTP errors in one JSON shape."""

    async def sagakit_error(_: Request, exc: Exception) -> JSONResponse:
        code = next((c for kind, c in _STATUS if isinstance(exc, kind)), 500)
        return error_response(code, type(exc).__name__, str(exc))

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status_code, exc.error, exc.detail)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()]
        detail = "; ".join(problems) + "; nothing was written"
        return error_response(422, "InvalidRequest", detail)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ValueError | RecursionError):
            # FastAPI's answer to a body that json.loads refused other than as a syntax error
            # (invalid UTF-8, an integer of over 4300 digits, nesting too deep for Python).
            detail = f"the body is not JSON that can be read: {cause}; nothing was written"
            return error_response(422, "InvalidRequest", detail)
        return error_response(exc.status_code, "HTTPError", str(exc.detail))

    api.add_exception_handler(SagakitError, sagakit_error)
    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(RequestValidationError, invalid_request)
    api.add_exception_handler(HTTPException, http_error)
