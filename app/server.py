"""How ``metasent serve`` runs the app under uvicorn: the connection-level limits live here, in
one place, so the tests start a server exactly as the command does."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body
from .settings import Settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def _timeout_answer(seconds: float) -> bytes:
    """The raw ``408`` response (JSON error body, ``Connection: close``) to a connection whose
    headers did not arrive within ``seconds``."""
    message = f"the request line and headers did not arrive within {seconds:g} s"
    detail = {
        "field": "headers",
        "message": message,
        "fix": f"send the whole request line and headers within {seconds:g} s of connecting or of the "
        "request's first byte (server setting METASENT_HEADER_TIMEOUT_S)",
    }
    body = json.dumps(error_body("header_timeout", message, [detail])).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers.

    uvicorn times out idle keep-alive connections only after a response; a connection that sends
    nothing, or part of a request line and headers and then stalls, is otherwise held for good
    (and counts against ``limit_concurrency`` until every new request answers 503). Here a timer
    of ``header_timeout_s`` seconds starts when the connection opens and when the first bytes of a
    later request arrive; it stops once h11 has parsed the request's headers. When it fires the
    connection gets a ``408`` JSON error and is closed. Bodies have their own deadline
    (:class:`app.limits.BodyLimitMiddleware`).

    :func:`uvicorn_config` makes a subclass carrying the setting (``METASENT_HEADER_TIMEOUT_S``).
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers():
            self._arm_header_timer()  # keeps the deadline of the request's first byte
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        """Whether the client owes the headers of a request (h11 has not seen a whole one)."""
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers():
            return
        pending = len(self.conn.trailing_data[0])
        if pending == 0 and self.cycle is not None:  # an idle keep-alive connection: its own timer
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        logger.info("closed %s: no complete request headers within %g s", client, self.header_timeout_s)
        self.transport.write(_timeout_answer(self.header_timeout_s))
        self.transport.close()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings``.

    The HTTP parser is h11, whose ``h11_max_incomplete_event_size`` caps the request line and
    headers at ``max_header_bytes`` while they are read (httptools has no such cap: it holds
    headers of any size); :class:`HeaderTimeoutProtocol` closes connections whose headers take
    longer than ``header_timeout_s``; ``limit_concurrency`` answers 503 past ``max_connections``
    open connections or running requests; ``timeout_keep_alive`` closes idle keep-alive
    connections after ``keep_alive_s``. Bodies are bounded in the app
    (:class:`app.limits.BodyLimitMiddleware`).

    Args:
        app (`FastAPI`): the application (:func:`app.main.create_app`).
        settings (`Settings`): ``host``, ``port``, ``log_level`` and the limits above.

    Returns:
        `uvicorn.Config`: pass it to ``uvicorn.Server(config).run()``.
    """
    import uvicorn

    faulthandler.enable()  # a fatal signal (SIGBUS from SQLite's -shm mapping, SIGSEGV) is logged with its stack
    protocol = type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the logging the caller configured
        access_log=False,  # the request-id middleware logs every request
        http=protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
    )
