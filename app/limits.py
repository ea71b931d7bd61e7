"""Request limits as ASGI middleware: body bytes (413) and wall time per request (503).

Both answer in the project's JSON error shape (:func:`app.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: at once from ``Content-Length``, and while
    reading a body sent without one (chunked) as soon as it passes the limit.

    The body (at most ``max_bytes``) is read before the app runs and replayed to it.

    Args:
        app (`ASGIApp`): the wrapped application.
        max_bytes (`int`): the limit (``METASENT_MAX_BODY_BYTES``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> ApiError:
        return ApiError(
            413,
            "body_too_large",
            f"the request body is {size} bytes; this server accepts at most {self.max_bytes}",
            "body",
            f"send a body of at most {self.max_bytes} bytes: fewer or shorter texts per request "
            "(server setting METASENT_MAX_BODY_BYTES)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(self._too_large(length.decode()))(scope, receive, send)
            return
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await error_response(self._too_large(f"more than {self.max_bytes}"))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class TimeoutMiddleware:
    """Answer 503 with ``Retry-After`` when a request runs longer than ``seconds``.

    The request's task is cancelled: a classify request leaves its batch, an adaptation that was
    still queued leaves the queue, and one already running finishes in its worker thread with
    its result dropped (:class:`app.queue.AdaptationQueue`), so a timeout never stores anything.

    Args:
        app (`ASGIApp`): the wrapped application.
        seconds (`float`): the limit (``METASENT_REQUEST_TIMEOUT_S``).
        retry_after (`Callable[[], int]`, *optional*): seconds for ``Retry-After`` (default 1).
    """

    def __init__(self, app: ASGIApp, seconds: float, retry_after: Callable[[], int] | None = None) -> None:
        self.app = app
        self.seconds = seconds
        self.retry_after = retry_after or (lambda: 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_tracked))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.seconds)
        except asyncio.CancelledError:  # the server gave up on this request (client gone)
            task.cancel()
            raise
        if task in done or started:  # a response that began is let finish
            await task
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.warning("request timed out after %.1f s: %s %s", self.seconds, scope["method"], scope["path"])
        await error_response(self._timed_out())(scope, receive, send)

    def _timed_out(self) -> ApiError:
        seconds = max(1, math.ceil(self.retry_after()))
        return ApiError(
            503,
            "request_timeout",
            f"the request took longer than this server's limit of {self.seconds:g} s and was abandoned",
            "server",
            f"retry in {seconds} s (Retry-After header), or send fewer examples or texts per request "
            "(server setting METASENT_REQUEST_TIMEOUT_S)",
            headers={"Retry-After": str(seconds)},
        )
