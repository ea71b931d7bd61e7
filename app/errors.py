"""Error mapping, in one place: every error answers ``{"error": {code, message, details}}``
where each detail names the field and the fix."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .storage import StoreUnavailableError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client can fix.

    Args:
        status (`int`): HTTP status (4xx).
        code (`str`): machine-readable code, e.g. ``"domain_not_found"``.
        message (`str`): what went wrong.
        field (`str`): which part of the request.
        fix (`str`): what to change.
        headers (`dict[str, str]`, *optional*): response headers, e.g. ``WWW-Authenticate`` or
            ``Retry-After``.
    """

    def __init__(
        self, status: int, code: str, message: str, field: str, fix: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.fix = status, code, message, field, fix
        self.headers = headers


def error_body(code: str, message: str, details: list[dict[str, str]]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


_FIXES = {
    "missing": "add this field",
    "string_type": "send a JSON string",
    "list_type": "send a JSON array",
    "int_type": "send a JSON integer (not a string, boolean or float)",
    "model_attributes_type": "send a JSON object",
    "dict_type": "send a JSON object",
    "string_too_short": "send a non-empty string",
    "string_too_long": "send a shorter string",
    "too_short": "send more items",
    "extra_forbidden": "remove this field",
    "value_error": "see the message",
}


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body",)]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _validation_details(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    details = []
    for error in errors:
        kind = error.get("type", "")
        message = str(error.get("msg", "invalid value"))
        fix = _FIXES.get(kind, "correct this value")
        if kind == "value_error":
            fix = message.removeprefix("Value error, ")
        details.append({"field": _field_name(tuple(error.get("loc", ()))), "message": message, "fix": fix})
    return details


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


def error_response(exc: ApiError) -> JSONResponse:
    """The JSON error response of ``exc`` (also used by the ASGI middlewares, outside the routes)."""
    details = [{"field": exc.field, "message": exc.message, "fix": exc.fix}]
    return JSONResponse(error_body(exc.code, exc.message, details), status_code=exc.status, headers=exc.headers)


def _malformed_json(message: str = "the request body is not valid JSON") -> JSONResponse:
    detail = {"field": "body", "message": message, "fix": "send a valid JSON document, encoded as UTF-8"}
    return JSONResponse(error_body("malformed_json", message, [detail]), status_code=400)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return _malformed_json()
    details = _validation_details(errors)
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse(error_body("invalid_request", message, details), status_code=422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parse error
        return _malformed_json("the request body is not valid UTF-8 (JSON text must be UTF-8)")
    detail = {"field": "path", "message": str(exc.detail), "fix": "see /docs for the routes and methods"}
    return JSONResponse(
        error_body(f"http_{exc.status_code}", str(exc.detail), [detail]),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


STORE_RETRY_AFTER_S = 5


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A database that does not answer or takes no writes (connection lost, locked past its busy
    timeout, pool exhausted, read-only): 503, not an internal error; nothing was written (each
    write is one transaction). The store raises :class:`StoreUnavailableError` for it; the message
    is the driver's, with no SQL parameters (``hide_parameters``)."""
    logger.error("domain store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        ApiError(
            503,
            "store_unavailable",
            "the domain store (database) is not reachable; nothing was changed",
            "server",
            f"retry in {STORE_RETRY_AFTER_S} s (Retry-After header); /readyz reports when the store is back",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    detail = {"field": "server", "message": "internal error", "fix": "retry; report it if it persists"}
    return JSONResponse(error_body("internal_error", "internal error", [detail]), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Map :class:`ApiError`, validation errors, HTTP errors, an unreachable database (503) and
    anything unexpected to the JSON error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StoreUnavailableError, _store_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
