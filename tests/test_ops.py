"""Running it in production: the adaptation queue (429 + Retry-After), request timeouts (503),
the body limit (413), the truncation flag, /metrics, /readyz and JSON logs with the request id."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metasent.app.errors import ApiError
from metasent.app.main import create_app
from metasent.app.observability import configure_logging, make_formatter, request_id_var
from metasent.app.queue import AdaptationQueue
from metasent.app.settings import Settings
from tests.conftest import (
    WORDS,
    assert_error,
    gated_adaptations,
    metric,
    request_timeout,
    running,
    valid_domain,
    wait_until,
)


def make_settings(checkpoint: Path, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(checkpoint=checkpoint, device="cpu", data_dir=data_dir, **overrides)


# -- the queue on its own ------------------------------------------------------------------------


def test_queue_full_raises_429_with_retry_after() -> None:
    async def scenario() -> None:
        queue = AdaptationQueue(capacity=2, default_seconds=3.0)
        release = threading.Event()
        first = asyncio.create_task(queue.run(release.wait, 5))
        second = asyncio.create_task(queue.run(lambda: "second"))
        await wait_until(lambda: queue.depth == 2, "both jobs in the queue")
        with pytest.raises(ApiError) as raised:
            await queue.run(lambda: "third")
        error = raised.value
        assert error.status == 429 and error.code == "adaptation_queue_full"
        assert error.headers == {"Retry-After": "6"}  # 3 s (no history yet) x depth 2
        release.set()
        assert await first is True and await second == "second"
        assert queue.depth == 0
        assert await queue.run(lambda: "fourth") == "fourth"
        fresh = AdaptationQueue(capacity=1, default_seconds=3.0)
        assert fresh.retry_after() == 3  # no history: the default estimate
        assert await fresh.run(lambda: "instant") == "instant"
        assert fresh.retry_after() == 1  # the measured (instant) adaptation replaces it; at least 1 s

    asyncio.run(scenario())


def test_queue_runs_one_at_a_time_and_drops_abandoned_jobs() -> None:
    async def scenario() -> None:
        observed: list[float] = []
        queue = AdaptationQueue(capacity=5, observe=observed.append)
        running_now, most, started, calls = 0, 0, [], []
        lock = threading.Lock()
        release = threading.Event()

        def work(name: str) -> str:
            nonlocal running_now, most
            with lock:
                running_now += 1
                most = max(most, running_now)
                started.append(name)
            if name == "job0":
                assert release.wait(30), "the test never released job0"
            time.sleep(0.05)  # the work itself: long enough for a second job to overlap if one could
            with lock:
                running_now -= 1
            calls.append(name)
            return name

        tasks = [asyncio.create_task(queue.run(work, f"job{i}")) for i in range(3)]
        waiting = asyncio.create_task(queue.run(work, "abandoned"))
        await wait_until(lambda: started == ["job0"], "job0 to start")  # and held until released
        assert queue.depth == 4
        waiting.cancel()  # a request that gave up while queued leaves the queue at once
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.depth == 3 and started == ["job0"]
        release.set()
        assert await asyncio.gather(*tasks) == ["job0", "job1", "job2"]
        # jobs run in arrival order: the abandoned job's turn comes (and is skipped) before this one
        assert await queue.run(work, "after") == "after"
        assert most == 1 and calls == ["job0", "job1", "job2", "after"] and queue.depth == 0
        assert len(observed) == 4 and all(s >= 0.05 for s in observed)

    asyncio.run(scenario())


def test_queue_delivers_errors() -> None:
    async def scenario() -> None:
        queue = AdaptationQueue(capacity=1)

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await queue.run(fail)
        assert queue.depth == 0

    asyncio.run(scenario())


# -- back-pressure and timeouts over HTTP --------------------------------------------------------


def test_full_queue_answers_429_then_recovers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(tiny_checkpoint, tmp_path, adapt_queue_size=1))

    async def scenario() -> None:
        async with running(app) as client:
            with gated_adaptations(app) as gate:  # the first adaptation holds the one slot
                requests = [asyncio.create_task(client.post("/v1/domains", json=valid_domain())) for _ in range(3)]
                await wait_until(
                    lambda: gate.entered == 1 and sum(r.done() for r in requests) == 2,
                    "one adaptation held and two requests answered",
                )
                refused = [r.result() for r in requests if r.done()]
                assert [r.status_code for r in refused] == [429, 429]
                assert app.state.adapt_queue.depth == 1 and gate.finished == 0
                # Retry-After is the queue's estimate: no adaptation timed yet, the 1 s default x depth 1
                expected = str(app.state.adapt_queue.retry_after())
                assert expected == "1" and [r.headers["Retry-After"] for r in refused] == [expected, expected]
                gate.release()
                responses = await asyncio.gather(*requests)
            assert gate.entered == 1  # the refused requests never adapted
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [201, 429, 429], [r.text for r in responses]
            for response in responses:
                if response.status_code == 429:
                    assert_error(response, 429, "server", "adaptation_queue_full")
                    assert "METASENT_ADAPT_QUEUE_SIZE" in response.json()["error"]["details"][0]["fix"]
            assert app.state.adapt_queue.depth == 0
            assert (await client.post("/v1/domains", json=valid_domain())).status_code == 201
            assert len((await client.get("/v1/domains")).json()["domains"]) == 2

    asyncio.run(scenario())


def test_timed_out_adaptation_answers_503_and_stores_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # 1 s: ample for the handler to reach the adaptation, which the gate then holds past the limit
    app = create_app(make_settings(tiny_checkpoint, tmp_path, request_timeout_s=1.0))

    async def scenario() -> None:
        async with running(app) as client:
            with gated_adaptations(app) as gate:
                response = await client.post("/v1/domains", json=valid_domain())
                error = assert_error(response, 503, "server", "request_timeout")
                assert "limit of 1 s" in error["message"]  # METASENT_REQUEST_TIMEOUT_S reached the middleware
                assert response.headers["Retry-After"] == str(app.state.adapt_queue.retry_after())  # the queue's
                # answered at the timeout, while its adaptation is still held in its thread
                assert gate.entered == 1 and gate.finished == 0 and app.state.adapt_queue.depth == 1
                gate.release()
                await wait_until(
                    lambda: gate.finished == 1 and app.state.adapt_queue.depth == 0, "the adaptation to finish"
                )
            with request_timeout(app, 60):  # the requests below are not the ones timed out
                assert (await client.get("/v1/domains")).json()["domains"] == []  # nothing half-stored
                created = await client.post("/v1/domains", json=valid_domain())
                assert created.status_code == 201, created.text
                domain_id = created.json()["domain_id"]
                classified = await client.post(f"/v1/domains/{domain_id}/classify", json={"texts": ["great coffee"]})
                assert classified.status_code == 200

    asyncio.run(scenario())


# -- body limit ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_client(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tiny_checkpoint, tmp_path_factory.mktemp("body-data"), max_body_bytes=4096)
    with TestClient(create_app(settings)) as client:
        yield client


def test_body_limit_from_content_length(small_body_client: TestClient) -> None:
    body = {"name": "big", "examples": [{"text": "great coffee " * 50, "label": str(i % 2)} for i in range(10)]}
    response = small_body_client.post("/v1/domains", json=body)
    error = assert_error(response, 413, "body", "body_too_large")
    assert "4096" in error["message"] and "METASENT_MAX_BODY_BYTES" in error["details"][0]["fix"]
    assert small_body_client.get("/v1/domains").json()["domains"] == []


def test_body_limit_while_streaming(small_body_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big", "examples": ['
        for _ in range(100):
            yield b'{"text": "great coffee great coffee great coffee", "label": "positive"},'
        yield b'{"text": "bad", "label": "negative"}]}'

    response = small_body_client.post("/v1/domains", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body", "body_too_large")


def test_body_under_limit_is_served(small_body_client: TestClient) -> None:
    response = small_body_client.post("/v1/domains", json=valid_domain())
    assert response.status_code == 201, response.text
    assert small_body_client.delete(f"/v1/domains/{response.json()['domain_id']}").status_code == 204


# -- truncation flag, metrics, readiness ---------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tiny_checkpoint, tmp_path_factory.mktemp("ops-data"), max_text_chars=2000)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_truncated_flag(client: TestClient) -> None:
    domain = client.post("/v1/domains", json=valid_domain()).json()
    limit = client.app.state.service.model.max_length()  # type: ignore[attr-defined]
    assert limit == 32
    fits = " ".join(WORDS[: limit - 2])  # + [CLS] and [SEP]: exactly the limit
    over = " ".join(WORDS[: limit - 1])
    over_chars = "great " * 400  # 2400 characters: over max_text_chars
    texts = ["great coffee", fits, over, over_chars]
    response = client.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    assert [p["truncated"] for p in response.json()["predictions"]] == [False, False, True, True]
    assert client.app.state.service.token_counts([fits, over]) == [limit, limit + 1]  # type: ignore[attr-defined]


def test_metrics_after_requests(client: TestClient) -> None:
    before = client.get("/metrics").text
    domain = client.post("/v1/domains", json=valid_domain()).json()
    client.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": ["great"]})
    client.get("/v1/domains/not-a-domain")
    client.get("/v1/domains/another-unknown")
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    not_found = 'metasent_http_requests_total{method="GET",route="/v1/domains/{domain_id}",status="404"}'
    assert metric(text, not_found) == 2  # by template: both unknown ids in one series
    assert "not-a-domain" not in text and "/no/such/route" not in text
    assert metric(text, 'metasent_http_requests_total{method="GET",route="unmatched",status="404"}') == 1
    created = 'metasent_http_requests_total{method="POST",route="/v1/domains",status="201"}'
    assert metric(text, created) == metric(before, created, default=0) + 1
    classify = 'metasent_http_request_duration_seconds_count{method="POST",route="/v1/domains/{domain_id}/classify"'
    assert metric(text, classify) == metric(before, classify, default=0) + 1
    adaptations = "metasent_adaptation_seconds_count"
    assert metric(text, adaptations) == metric(before, adaptations, default=0) + 1  # the one domain created
    assert metric(text, "metasent_adaptation_queue_depth") == 0
    assert metric(text, "metasent_domains") == len(client.get("/v1/domains").json()["domains"])
    (info,) = [line for line in text.splitlines() if line.startswith("metasent_model_info{")]
    assert 'algorithm="none"' in info and 'encoder="tiny-bert"' in info and 'device="cpu"' in info


def test_readyz_before_and_after_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(tiny_checkpoint, tmp_path))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the model is not loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as bare:
            response = await bare.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {"status": "not_ready", "model_loaded": False, "store_reachable": False}
        async with running(app) as client:
            response = await client.get("/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready", "model_loaded": True, "store_reachable": True}

            class DownStore:
                def __len__(self) -> int:
                    return 0

                def ping(self) -> bool:
                    raise ConnectionError("database is down")

            store = app.state.store
            app.state.store = DownStore()
            response = await client.get("/readyz")
            assert response.status_code == 503 and response.json()["store_reachable"] is False
            app.state.store = store
            assert (await client.get("/readyz")).status_code == 200

    asyncio.run(scenario())


# -- logs ----------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_log_lines_carry_the_request_id(
    client: TestClient, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", "json")
    service = client.app.state.service  # type: ignore[attr-defined]
    original = service.adapt

    def adapt(texts: list[str], labels: list[str]) -> Any:
        logging.getLogger("metasent.test").info("adapting %d examples", len(texts))  # in the worker thread
        return original(texts, labels)

    service.adapt = adapt
    try:
        response = client.post("/v1/domains", json=valid_domain(), headers={"X-Request-ID": "req-42"})
    finally:
        service.adapt = original
    assert response.status_code == 201
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-42"]
    messages = [line["message"] for line in mine]
    assert "adapting 10 examples" in messages
    (access,) = [line for line in mine if line.get("path") == "/v1/domains"]
    assert access["status"] == 201 and access["method"] == "POST" and access["level"] == "INFO"
    assert {"time", "logger", "ms"} <= set(access)
    assert request_id_var.get() is None  # reset after the request


def test_text_log_format_has_the_request_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.request_id = "abc"
    assert "[abc]: hello" in make_formatter("text").format(record)
    with pytest.raises(ValueError, match="json or text"):
        make_formatter("xml")
