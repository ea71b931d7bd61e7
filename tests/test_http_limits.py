"""Connection-level limits against a real uvicorn server configured as ``metasent serve`` does
(:func:`metasent.app.server.uvicorn_config`), spoken to over raw sockets: a stalled request body
is answered 408 and closed within ``body_timeout_s``, oversized headers are refused, and
connections past ``max_connections`` answer 503, while ordinary requests are served."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.server import uvicorn_config
from metasent.app.settings import Settings
from tests.conftest import assert_error, serve_in_thread, valid_domain

BODY_TIMEOUT_S, MAX_HEADER_BYTES, MAX_CONNECTIONS = 1.0, 8 * 1024, 6
ANSWER_WITHIN_S = 15  # the socket waits this long for an answer: far above the body timeout


def limited_settings(checkpoint: Path, data_dir: Path) -> Settings:
    return Settings(
        checkpoint=checkpoint,
        device="cpu",
        data_dir=data_dir,
        body_timeout_s=BODY_TIMEOUT_S,
        max_header_bytes=MAX_HEADER_BYTES,
        max_connections=MAX_CONNECTIONS,
        log_level="WARNING",
    )


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = limited_settings(tiny_checkpoint, tmp_path_factory.mktemp("limits"))
    with serve_in_thread(create_app(settings), settings=settings) as url:
        yield url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=ANSWER_WITHIN_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (``socket.timeout`` when it
    neither answers nor closes within ``ANSWER_WITHIN_S``)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def head(path: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def test_stalled_body_answers_408_and_closes(server: str) -> None:
    body = json.dumps(valid_domain()).encode()
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head("/v1/domains", len(body)) + body[:10])  # 10 bytes of the promised body, then nothing
        answer = read_until_closed(sock)  # the server closes the connection after answering
        elapsed = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_timeout" and error["details"][0]["field"] == "body"
    assert "METASENT_BODY_TIMEOUT_S" in error["details"][0]["fix"]
    assert BODY_TIMEOUT_S <= elapsed < ANSWER_WITHIN_S


def test_whole_body_sent_in_pieces_is_served(server: str) -> None:
    body = json.dumps(valid_domain()).encode()
    with connect(server) as sock:
        sock.sendall(head("/v1/domains", len(body), "Connection: close\r\n") + body[:10])
        sock.sendall(body[10:])
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    domain_id = json.loads(answer.partition(b"\r\n\r\n")[2])["domain_id"]
    assert httpx.delete(f"{server}/v1/domains/{domain_id}").status_code == 204


def test_oversized_headers_are_refused(server: str) -> None:
    with connect(server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n")
            answer = read_until_closed(sock)
        except (BrokenPipeError, ConnectionResetError):  # refused while still sending: also a refusal
            answer = b""
    assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:300]
    # headers under the cap are served
    response = httpx.get(f"{server}/healthz", headers={"X-Fine": "a" * (MAX_HEADER_BYTES // 2)})
    assert response.status_code == 200, response.text


def test_connections_past_the_limit_answer_503(server: str) -> None:
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):  # idle connections: open, nothing sent
            stack.enter_context(connect(server))
        response = httpx.get(f"{server}/healthz")
        assert response.status_code == 503, response.text
    deadline = time.monotonic() + ANSWER_WITHIN_S  # the server notices the closed connections
    while (status := httpx.get(f"{server}/healthz").status_code) != 200:
        assert status == 503 and time.monotonic() < deadline, status


def test_header_limit_in_the_app_answers_431(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Behind a server whose parser lets them through, the app itself refuses oversized headers."""
    with TestClient(create_app(limited_settings(tiny_checkpoint, tmp_path))) as client:
        response = client.get("/healthz", headers={"X-Big": "a" * MAX_HEADER_BYTES})
        assert_error(response, 431, "headers", "headers_too_large")
        assert client.get("/healthz", headers={"X-Fine": "a" * (MAX_HEADER_BYTES // 2)}).status_code == 200


def test_serve_config_carries_the_limits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_header_bytes=4096, max_connections=12, keep_alive_s=7)
    config = uvicorn_config(create_app(settings), settings)
    assert (config.http, config.h11_max_incomplete_event_size) == ("h11", 4096)
    assert (config.limit_concurrency, config.timeout_keep_alive) == (12, 7)
    defaults = Settings(data_dir=tmp_path)
    assert (defaults.body_timeout_s, defaults.max_header_bytes, defaults.max_connections) == (30.0, 32768, 256)
