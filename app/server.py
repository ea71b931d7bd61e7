"""How ``metasent serve`` runs the app under uvicorn: the connection-level limits live here, in
one place, so the tests start a server exactly as the command does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings``.

    The HTTP parser is h11, whose ``h11_max_incomplete_event_size`` caps the request line and
    headers at ``max_header_bytes`` while they are read (httptools has no such cap: it holds
    headers of any size); ``limit_concurrency`` answers 503 past ``max_connections`` open
    connections or running requests; ``timeout_keep_alive`` closes idle keep-alive connections
    after ``keep_alive_s``. Bodies are bounded in the app (:class:`app.limits.BodyLimitMiddleware`).

    Args:
        app (`FastAPI`): the application (:func:`app.main.create_app`).
        settings (`Settings`): ``host``, ``port``, ``log_level`` and the limits above.

    Returns:
        `uvicorn.Config`: pass it to ``uvicorn.Server(config).run()``.
    """
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the logging the caller configured
        access_log=False,  # the request-id middleware logs every request
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
    )
