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
from metasent.app.server import HeaderTimeoutProtocol, uvicorn_config
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


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a ``Content-Length`` body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    headers, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in headers.lower().split(b"\r\n") if line.startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


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
    settings = Settings(
        data_dir=tmp_path, max_header_bytes=4096, max_connections=12, keep_alive_s=7, header_timeout_s=3
    )
    config = uvicorn_config(create_app(settings), settings)
    assert issubclass(config.http, HeaderTimeoutProtocol) and config.h11_max_incomplete_event_size == 4096
    assert (config.limit_concurrency, config.timeout_keep_alive, config.http.header_timeout_s) == (12, 7, 3)
    defaults = Settings(data_dir=tmp_path)
    assert (defaults.body_timeout_s, defaults.max_header_bytes, defaults.max_connections) == (30.0, 32768, 256)
    assert defaults.header_timeout_s == 10.0


# -- request headers that never complete -----------------------------------------------------------

HEADER_TIMEOUT_S, STALLED = 1.0, 300


def test_stalled_headers_are_closed_and_the_server_answers_again(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Hundreds of connections that send a request line and one header, then nothing, fill the
    connection limit (new requests answer 503); each is answered 408 and closed within the
    header timeout, and new requests are served again."""
    settings = limited_settings(tiny_checkpoint, tmp_path).model_copy(
        update={"max_connections": STALLED - 50, "header_timeout_s": HEADER_TIMEOUT_S}
    )
    with serve_in_thread(create_app(settings), settings=settings) as url, ExitStack() as stack:
        stalled = [stack.enter_context(connect(url)) for _ in range(STALLED)]
        started = time.monotonic()
        for sock in stalled:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")  # no blank line: headers never end
        assert httpx.get(f"{url}/healthz").status_code == 503  # the limit is full of stalled connections
        deadline = started + HEADER_TIMEOUT_S + ANSWER_WITHIN_S
        while (status := httpx.get(f"{url}/healthz").status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, status
        answers = [read_until_closed(sock) for sock in stalled]  # every one was closed by the server
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), {a[:40] for a in answers}
    error = json.loads(answers[0].partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "header_timeout" and "METASENT_HEADER_TIMEOUT_S" in error["details"][0]["fix"]


def test_silent_connection_is_closed_but_a_slow_complete_request_is_served(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = limited_settings(tiny_checkpoint, tmp_path).model_copy(update={"header_timeout_s": HEADER_TIMEOUT_S})
    with serve_in_thread(create_app(settings), settings=settings) as url:
        with connect(url) as silent:
            assert read_until_closed(silent).startswith(b"HTTP/1.1 408")  # connected, sent nothing
        with connect(url) as sock:  # headers in pieces, whole within the timeout; then a keep-alive request
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            sock.sendall(b"Host: test\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200")
