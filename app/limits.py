"""Request limits as ASGI middleware: header bytes (431), body bytes (413), the time to receive a
body (408) and wall time per request (503); and the characters classify requests may hold
(:class:`CharBudget`, 413/503).

Both answer in the project's JSON error shape (:func:`app.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

logger = logging.getLogger(__name__)


class HeaderLimitMiddleware:
    """Refuse requests whose headers total more than ``max_bytes`` with 431.

    ``metasent serve`` caps them earlier, in its HTTP parser (h11's maximum incomplete event size,
    :func:`app.server.uvicorn_config`), before they are held in memory; this check covers the app
    behind any other server.

    Args:
        app (`ASGIApp`): the wrapped application.
        max_bytes (`int`): the limit, bytes of every ``name: value`` line (``METASENT_MAX_HEADER_BYTES``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > self.max_bytes:
                error = ApiError(
                    431,
                    "headers_too_large",
                    f"the request headers are {size} bytes; this server accepts at most {self.max_bytes}",
                    "headers",
                    f"send at most {self.max_bytes} bytes of headers (server setting METASENT_MAX_HEADER_BYTES)",
                    headers={"Connection": "close"},
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: at once from ``Content-Length``, and while
    reading a body sent without one (chunked) as soon as it passes the limit. A body that does not
    arrive whole within ``timeout_s`` of its headers (a stalled or trickled upload) answers 408 and
    the connection is closed, so a client cannot hold a connection and its buffered bytes forever.

    The body (at most ``max_bytes``) is read before the app runs and replayed to it.

    Args:
        app (`ASGIApp`): the wrapped application.
        max_bytes (`int`): the limit (``METASENT_MAX_BODY_BYTES``).
        timeout_s (`float`, defaults to 30): seconds to receive the whole body (``METASENT_BODY_TIMEOUT_S``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> ApiError:
        return ApiError(
            413,
            "body_too_large",
            f"the request body is {size} bytes; this server accepts at most {self.max_bytes}",
            "body",
            f"send a body of at most {self.max_bytes} bytes: fewer or shorter texts per request "
            "(server setting METASENT_MAX_BODY_BYTES)",
        )

    def _too_slow(self, received: int) -> ApiError:
        return ApiError(
            408,
            "body_timeout",
            f"the request body did not arrive within {self.timeout_s:g} s ({received} bytes received)",
            "body",
            f"send the whole body (as many bytes as Content-Length says) within {self.timeout_s:g} s "
            "(server setting METASENT_BODY_TIMEOUT_S)",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(self._too_large(length.decode()))(scope, receive, send)
            return
        messages = await self._read_body(receive)
        if isinstance(messages, ApiError):
            if messages.status == 408:
                logger.warning(
                    "request body timed out after %.1f s: %s %s", self.timeout_s, scope["method"], scope["path"]
                )
            await error_response(messages)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> list[Message] | ApiError:
        """The body's messages, or the error to answer: 413 past ``max_bytes``, 408 past ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        messages: list[Message] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return self._too_slow(received)
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return self._too_large(f"more than {self.max_bytes}")
            if not message.get("more_body", False):
                return messages


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


class CharBudget:
    """A memory bound for classification: characters of text per request and in flight.

    A request whose texts (and support texts) total more than ``per_request`` characters answers
    413; one that would take the characters held by admitted, unfinished requests past
    ``in_flight`` answers 503 with ``Retry-After`` at once (it is not queued, so it holds nothing).
    The server's event loop is the only caller, so no lock is needed.

    Args:
        per_request (`int`): characters of one request (``METASENT_MAX_REQUEST_CHARS``).
        in_flight (`int`): characters of every admitted request together (``METASENT_MAX_INFLIGHT_CHARS``).
    """

    def __init__(self, per_request: int, in_flight: int) -> None:
        self.per_request, self.in_flight = per_request, in_flight
        self.admitted = 0  # characters of the requests now admitted
        self.peak = 0  # the most characters ever admitted at once

    @contextlib.contextmanager
    def admit(self, chars: int, field: str) -> Iterator[None]:
        """Hold ``chars`` characters while the block runs.

        Raises:
            ApiError: 413 naming ``field`` past ``per_request``; 503 past ``in_flight``.
        """
        if chars > self.per_request:
            raise ApiError(
                413,
                "too_many_characters",
                f"this request sends {chars} characters of text; this server accepts at most {self.per_request}",
                field,
                f"send at most {self.per_request} characters of text per request: fewer or shorter texts "
                "(server setting METASENT_MAX_REQUEST_CHARS)",
            )
        if self.admitted + chars > self.in_flight:
            raise ApiError(
                503,
                "server_busy",
                f"the server is classifying {self.admitted} characters of other requests; {chars} more would pass "
                f"its limit of {self.in_flight} in flight",
                "server",
                "retry in 1 s (Retry-After header), or send fewer characters per request "
                "(server setting METASENT_MAX_INFLIGHT_CHARS)",
                headers={"Retry-After": "1"},
            )
        self.admitted += chars
        self.peak = max(self.peak, self.admitted)
        try:
            yield
        finally:
            self.admitted -= chars
