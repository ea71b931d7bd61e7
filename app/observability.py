"""Logging, configured in one place: JSON lines (python-json-logger) or plain text, every line of a
request carrying its ``request_id`` through a context variable."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

JSON_FIELDS = ["asctime", "levelname", "name", "message", "request_id"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Add ``request_id`` (the current request's, or None outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``METASENT_LOG_FORMAT``: ``json`` or ``text``.

    Raises:
        ValueError: for another format.
    """
    if log_format == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r}: use json or text")


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    """Send every log record (metasent's, uvicorn's, libraries') to stderr in one format.

    Args:
        level (`str`, defaults to ``"INFO"``): the root level (``METASENT_LOG_LEVEL``).
        log_format (`str`, defaults to ``"json"``): ``json`` or ``text`` (``METASENT_LOG_FORMAT``).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # through the root handler
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
