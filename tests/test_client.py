"""The Python client against the real app (in process and over a real socket), with and without
API keys, its error mapping, and the ``metasent adapt`` / ``metasent classify`` commands against a
live server."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bench.load import FALLBACK, fresh_schema, percentile, run_load
from metasent.app.client import MetasentClient, MetasentError, read_examples, read_texts
from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.cli import cli
from tests.conftest import NEGATIVE, POSITIVE, POSTGRES_URL, free_port, metric, serve_in_thread, support

runner = CliRunner()


KEY = "client-key-0123456789"


@pytest.fixture(scope="module")
def test_client(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", max_texts=5, data_dir=tmp_path_factory.mktemp("c"))
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_app(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with one API key configured."""
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", api_keys=KEY, data_dir=tmp_path_factory.mktemp("k"))
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def client(test_client: TestClient) -> Iterator[MetasentClient]:
    with MetasentClient(http_client=test_client) as metasent:
        yield metasent
        for domain in metasent.list_domains():
            metasent.delete_domain(domain["domain_id"])


def test_client_round_trip(client: MetasentClient) -> None:
    domain = client.create_domain("food", support())
    assert domain["labels"] == ["positive", "negative"] and domain["num_examples"] == 10
    assert client.get_domain(domain["domain_id"]) == domain
    assert [d["domain_id"] for d in client.list_domains()] == [domain["domain_id"]]
    result = client.classify(domain["domain_id"], [POSITIVE[9], NEGATIVE[9]])
    assert result["domain_id"] == domain["domain_id"] and len(result["predictions"]) == 2
    assert all(p["truncated"] is False for p in result["predictions"])
    assert client.delete_domain(domain["domain_id"]) is None
    assert client.list_domains() == []


# every REST operation of the app's OpenAPI document, and the client method that calls it
CLIENT_METHODS = {
    ("GET", "/healthz"): "health",
    ("GET", "/readyz"): "ready",
    ("GET", "/metrics"): "metrics",
    ("POST", "/v1/domains"): "create_domain",
    ("GET", "/v1/domains"): "list_domains",
    ("GET", "/v1/domains/{domain_id}"): "get_domain",
    ("DELETE", "/v1/domains/{domain_id}"): "delete_domain",
    ("GET", "/v1/domains/{domain_id}/examples"): "get_examples",
    ("PUT", "/v1/domains/{domain_id}/examples"): "update_examples",
    ("POST", "/v1/domains/{domain_id}/classify"): "classify",
    ("POST", "/v1/domains/{domain_id}/suggest"): "suggest",
    ("POST", "/v1/classify"): "classify_stateless",
}


def test_every_rest_operation_has_a_client_method(test_client: TestClient) -> None:
    """A new route without a client method (or a client method whose route went away) fails here."""
    schema = test_client.get("/openapi.json").json()
    operations = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert operations == set(CLIENT_METHODS), "add the new operation to MetasentClient and to CLIENT_METHODS"
    for name in CLIENT_METHODS.values():
        assert callable(getattr(MetasentClient, name, None)), f"MetasentClient has no method {name}"


def test_client_suggest_ready_and_metrics_against_the_app(client: MetasentClient) -> None:
    domain = client.create_domain("food", support())
    candidates = ["a lovely meal", "awful soup", "a lovely meal", "fine bread", "cold and bland"]
    answer = client.suggest(domain["domain_id"], candidates, k=2)
    assert answer["domain_id"] == domain["domain_id"] and answer["method"] == "badge"
    picked = answer["suggestions"]
    assert len(picked) == 2 and all(candidates[s["index"]] == s["text"] for s in picked)
    assert client.ready() == {"status": "ready", "model_loaded": True, "store_reachable": True}
    assert metric(client.metrics(), "metasent_domains ") >= 1
    with pytest.raises(MetasentError) as missing:
        client.suggest("0" * 32, candidates)
    assert missing.value.status == 404 and missing.value.code == "domain_not_found"


def test_client_maps_errors(client: MetasentClient) -> None:
    with pytest.raises(MetasentError) as missing:
        client.get_domain("nope")
    error = missing.value
    assert (error.status, error.code, error.field) == (404, "domain_not_found", "domain_id")
    assert error.fix and "POST /v1/domains" in error.fix and "domain_not_found" in str(error)

    with pytest.raises(MetasentError) as invalid:
        client.create_domain("x", [{"text": "great", "label": "positive"}, {"text": "", "label": "negative"}])
    error = invalid.value
    assert (error.status, error.code, error.field) == (422, "invalid_request", "examples[1].text")

    domain = client.create_domain("food", support())
    with pytest.raises(MetasentError) as too_many:
        client.classify(domain["domain_id"], ["great"] * 6)
    assert (too_many.value.status, too_many.value.code, too_many.value.field) == (413, "too_many_items", "texts")


def test_client_update_examples_against_the_app(client: MetasentClient) -> None:
    domain = client.create_domain("food", support())
    domain_id = domain["domain_id"]
    added = client.update_examples(domain_id, [{"text": "okay fine average", "label": "neutral"}])
    assert (added["version"], added["num_examples"]) == (2, 11)
    assert added["labels"] == ["positive", "negative", "neutral"]
    examples = client.get_examples(domain_id)
    assert examples["version"] == 2 and examples["examples"][-1] == {"text": "okay fine average", "label": "neutral"}
    replaced = client.update_examples(domain_id, support("good", "bad"), mode="replace", expected_version=2)
    assert (replaced["version"], replaced["num_examples"], replaced["labels"]) == (3, 10, ["good", "bad"])
    assert client.classify(domain_id, [POSITIVE[9]])["predictions"][0]["label"] in ("good", "bad")

    with pytest.raises(MetasentError) as conflict:  # the version read is no longer the domain's
        client.update_examples(domain_id, support(), mode="replace", expected_version=2)
    error = conflict.value
    assert (error.status, error.code, error.field) == (409, "version_conflict", "expected_version")
    assert error.fix and "expected_version=3" in error.fix
    assert client.get_domain(domain_id) == replaced  # unchanged
    with pytest.raises(MetasentError) as one_label:
        client.update_examples(domain_id, [{"text": "tasty", "label": "x"}], mode="replace")
    assert (one_label.value.status, one_label.value.field) == (422, "examples")
    with pytest.raises(MetasentError) as missing:
        client.update_examples("nope", support())
    assert (missing.value.status, missing.value.code) == (404, "domain_not_found")


def test_client_classify_stateless_against_the_app(client: MetasentClient) -> None:
    result = client.classify_stateless(support(), [POSITIVE[9], NEGATIVE[9], "great " * 40])
    assert result["labels"] == ["positive", "negative"] and result["adaptation"]["steps"] == 3
    predictions = result["predictions"]
    assert [p["truncated"] for p in predictions] == [False, False, True]  # 40 words > the 32-token limit
    assert all(sum(p["scores"].values()) == pytest.approx(1, abs=1e-4) for p in predictions)
    assert client.list_domains() == []  # nothing stored
    with pytest.raises(MetasentError) as too_many:
        client.classify_stateless(support(), ["great"] * 6)
    assert (too_many.value.status, too_many.value.code, too_many.value.field) == (413, "too_many_items", "texts")
    with pytest.raises(MetasentError) as one_label:
        client.classify_stateless([{"text": "tasty", "label": "positive"}] * 2, ["great"])
    assert (one_label.value.status, one_label.value.field) == (422, "examples")


def test_client_sends_the_api_key(keyed_app: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METASENT_API_KEY", raising=False)
    with MetasentClient(http_client=keyed_app) as anonymous:
        with pytest.raises(MetasentError) as raised:
            anonymous.list_domains()
        assert (raised.value.status, raised.value.code, raised.value.field) == (401, "missing_api_key", "Authorization")
    with MetasentClient(api_key="wrong", http_client=keyed_app) as wrong:
        with pytest.raises(MetasentError) as raised:
            wrong.classify_stateless(support(), ["great"])
        assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")
    with MetasentClient(api_key=KEY, http_client=keyed_app) as keyed:
        domain = keyed.create_domain("food", support())
        assert keyed.update_examples(domain["domain_id"], [{"text": "fine", "label": "neutral"}])["version"] == 2
        assert keyed.classify_stateless(support(), ["great"])["labels"] == ["positive", "negative"]
    monkeypatch.setenv("METASENT_API_KEY", KEY)
    with MetasentClient(http_client=keyed_app) as from_env:
        assert [d["domain_id"] for d in from_env.list_domains()] == [domain["domain_id"]]
        from_env.delete_domain(domain["domain_id"])
        assert from_env.list_domains() == []


def test_client_error_without_json_body_and_retry_after() -> None:
    def bad_gateway(_: httpx.Request) -> httpx.Response:  # a proxy's answer: no server could
        return httpx.Response(502, text="<html>bad gateway</html>", headers={"Retry-After": "7"})

    http = httpx.Client(base_url="http://metasent", transport=httpx.MockTransport(bad_gateway))
    with pytest.raises(MetasentError) as raised, MetasentClient(http_client=http) as client:
        client.list_domains()
    assert (raised.value.status, raised.value.code) == (502, "http_502")
    assert "bad gateway" in raised.value.message and raised.value.retry_after == 7


def test_client_connection_error() -> None:
    with MetasentClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(MetasentError) as raised:
            client.list_domains()
    assert raised.value.status is None and raised.value.code == "connection_error"


def test_read_examples_and_texts(tmp_path: Path) -> None:
    jsonl = tmp_path / "support.jsonl"
    jsonl.write_text('{"text": "tasty", "label": "positive"}\n\n{"text": "stale", "label": "negative"}\n')
    csv_file = tmp_path / "support.csv"
    csv_file.write_text('text,label\n"tasty, fresh",positive\nstale,negative\n')
    assert read_examples(jsonl) == [{"text": "tasty", "label": "positive"}, {"text": "stale", "label": "negative"}]
    assert read_examples(csv_file)[0] == {"text": "tasty, fresh", "label": "positive"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "tasty"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_examples(bad)
    texts = tmp_path / "texts.txt"
    texts.write_text('plain line\n{"text": "from json"}\n')
    assert read_texts(texts) == ["plain line", "from json"]


# -- the CLI against a live server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=tmp_path_factory.mktemp("live"))
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_cli_adapt_and_classify(live_server: str, tmp_path: Path) -> None:
    examples = tmp_path / "support.jsonl"
    examples.write_text("\n".join(json.dumps(e) for e in support()) + "\n")
    adapted = runner.invoke(cli, ["adapt", "--server", live_server, "--name", "food", "--examples", str(examples)])
    assert adapted.exit_code == 0, adapted.output
    domain = json.loads(adapted.output)
    assert domain["name"] == "food" and domain["labels"] == ["positive", "negative"]

    texts = tmp_path / "texts.txt"
    texts.write_text(f"{NEGATIVE[9]}\n")
    args = ["classify", "--server", live_server, "--domain", domain["domain_id"], POSITIVE[9], "--file", str(texts)]
    classified = runner.invoke(cli, args)
    assert classified.exit_code == 0, classified.output
    result = json.loads(classified.output)
    assert result["domain_id"] == domain["domain_id"] and len(result["predictions"]) == 2

    with MetasentClient(live_server) as client:
        assert [d["domain_id"] for d in client.list_domains()] == [domain["domain_id"]]


def test_cli_csv_examples_and_env_server(live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = tmp_path / "support.csv"
    examples.write_text("text,label\n" + "\n".join(f"{e['text']},{e['label']}" for e in support()) + "\n")
    monkeypatch.setenv("METASENT_SERVER", live_server)
    adapted = runner.invoke(cli, ["adapt", "--name", "csv", "--examples", str(examples)])
    assert adapted.exit_code == 0, adapted.output
    assert json.loads(adapted.output)["num_examples"] == 10


def test_cli_errors(live_server: str, tmp_path: Path) -> None:
    unknown = runner.invoke(cli, ["classify", "--server", live_server, "--domain", "nope", "great"])
    assert unknown.exit_code == 1
    assert "404 domain_not_found" in unknown.output and "fix:" in unknown.output

    one_label = tmp_path / "one.jsonl"
    one_label.write_text('{"text": "tasty", "label": "positive"}\n{"text": "fresh", "label": "positive"}\n')
    invalid = runner.invoke(cli, ["adapt", "--server", live_server, "--name", "x", "--examples", str(one_label)])
    assert invalid.exit_code == 1 and "422 invalid_request" in invalid.output

    missing = runner.invoke(cli, ["adapt", "--server", live_server, "--name", "x", "--examples", "nope.jsonl"])
    assert missing.exit_code == 2 and "--examples" in missing.output
    no_texts = runner.invoke(cli, ["classify", "--server", live_server, "--domain", "nope"])
    assert no_texts.exit_code == 2


def test_load_script_against_a_live_server(live_server: str) -> None:
    before = httpx.get(f"{live_server}/metrics").text
    args = argparse.Namespace(clients=4, duration=2.0, adapt_share=0.3, texts=4, timeout=60.0, seed=0)
    result = asyncio.run(run_load(live_server, FALLBACK, args))
    after = httpx.get(f"{live_server}/metrics").text
    assert result["errors"] == 0, result["error_samples"]
    operations = result["operations"]
    assert operations["classify"]["requests"] > 0 and operations["adapt"]["requests"] > 0
    assert set(operations["classify"]["statuses"]) == {"200"}
    assert operations["adapt"]["statuses"].get("201", 0) == operations["delete"]["statuses"]["204"]

    # the script's counts are the server's: its request counters moved by as much
    def served(route: str, status: int, method: str = "POST") -> float:
        line = f'metasent_http_requests_total{{method="{method}",route="{route}",status="{status}"}}'
        return metric(after, line, default=0) - metric(before, line, default=0)

    assert served("/v1/domains/{domain_id}/classify", 200) == operations["classify"]["statuses"]["200"]
    assert served("/v1/domains", 201) == operations["adapt"]["statuses"]["201"] + 1  # + the shared domain
    adaptations = metric(after, "metasent_adaptation_seconds_sum") / metric(after, "metasent_adaptation_seconds_count")
    assert result["server_adaptation_seconds_mean"] == round(adaptations, 3)
    with MetasentClient(live_server) as client:  # the script cleans up after itself
        assert all(d["name"] not in ("load", "shared") for d in client.list_domains())


def test_load_script_across_two_replicas_on_one_postgresql(tiny_checkpoint: Path) -> None:
    from sqlalchemy import create_engine, text

    with fresh_schema(POSTGRES_URL) as url:
        schema = url.rsplit("search_path%3D", 1)[1]
        apps = [create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", database_url=url)) for _ in range(2)]
        with serve_in_thread(apps[0]) as one, serve_in_thread(apps[1]) as two:
            args = argparse.Namespace(clients=4, duration=2.0, adapt_share=0.3, texts=4, timeout=60.0, seed=0)
            result = asyncio.run(run_load([one, two], FALLBACK, args))
            assert result["errors"] == 0, result["error_samples"]
            assert result["servers"] == 2
            spread = result["requests_per_server"]
            assert set(spread) == {one, two} and min(spread.values()) > 0  # clients round-robin
            # the replica that did not create the shared domain classified with it from the store
            assert set(result["operations"]["classify"]["statuses"]) == {"200"}
            with MetasentClient(two) as client:
                assert client.list_domains() == []  # the script cleaned up on both
    engine = create_engine(POSTGRES_URL)
    with engine.connect() as connection:  # and the schema is gone
        found = connection.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": schema}).all()
    engine.dispose()
    assert found == []


def test_fresh_schema_wants_postgresql() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"), fresh_schema("sqlite:///x.db"):
        pass


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile([3.0], 0.99) == 3


# -- retries of 429 and 503, with Retry-After and an idempotency key --------------------------------


class FlakyServer:
    """An httpx transport that answers ``failures`` (status, Retry-After or None) in turn, then
    ``final`` (status, JSON body), recording every request."""

    def __init__(self, failures: list[tuple[int, str | None]], final: tuple[int, dict] = (201, {"domain_id": "d"})):
        self.failures = list(failures)
        self.final = final
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            status, retry_after = self.failures.pop(0)
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            error = {
                "code": "busy",
                "message": "try later",
                "details": [{"field": "server", "message": "m", "fix": "f"}],
            }
            return httpx.Response(status, json={"error": error}, headers=headers)
        status, body = self.final
        return httpx.Response(status, json=body)

    def client(self, waits: list[float], **kwargs: Any) -> MetasentClient:
        http = httpx.Client(base_url="http://metasent", transport=httpx.MockTransport(self))
        return MetasentClient(http_client=http, sleep=waits.append, **kwargs)

    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


def test_client_retries_503_and_429_as_retry_after_says_with_one_idempotency_key() -> None:
    server, waits = FlakyServer([(503, "7"), (429, "2.5")]), []
    with server.client(waits) as client:
        assert client.create_domain("food", support()) == {"domain_id": "d"}
    assert waits == [7.0, 2.5]  # the server's Retry-After, never slept for real
    (key,) = set(server.keys())  # one key for the call, the same on each of its 3 requests
    assert len(server.requests) == 3 and uuid.UUID(key).version == 4
    assert {r.content for r in server.requests} == {server.requests[0].content}  # the same body each time

    again = FlakyServer([(503, "0")], final=(200, {"version": 2}))
    with again.client(waits := []) as client:
        assert client.update_examples("d", support(), expected_version=1) == {"version": 2}
        client.create_domain("food", support())
    assert [r.method for r in again.requests] == ["PUT", "PUT", "POST"] and waits == [0.0]
    put_key, retried_key, next_key = again.keys()
    assert put_key == retried_key and next_key not in (None, put_key)  # a fresh key per logical call


def test_client_gives_up_after_max_attempts() -> None:
    server, waits = FlakyServer([(503, "1")] * 10), []
    with server.client(waits, max_attempts=3) as client, pytest.raises(MetasentError) as raised:
        client.create_domain("food", support(), idempotency_key="my-key")
    error = raised.value
    assert (error.status, error.code, error.attempts, error.retry_after) == (503, "busy", 3, 1.0)
    assert "gave up after 3 attempts" in str(error)
    assert len(server.requests) == 3 and waits == [1.0, 1.0] and set(server.keys()) == {"my-key"}


def test_client_backs_off_without_retry_after_and_caps_long_ones() -> None:
    server, waits = FlakyServer([(503, None), (503, None), (429, "3600")], final=(200, {"domains": []})), []
    with server.client(waits, max_wait_s=30) as client:
        assert client.list_domains() == []
    first, second, capped = waits
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 1.5 and capped == 30  # exponential + jitter; cut to max_wait_s
    assert server.keys() == [None] * 4  # reads carry no idempotency key


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422, 500, 502])
def test_client_does_not_retry_other_errors(status: int) -> None:
    server, waits = FlakyServer([(status, "1")]), []
    with server.client(waits) as client, pytest.raises(MetasentError) as raised:
        client.create_domain("food", support())
    assert raised.value.status == status and raised.value.attempts == 1
    assert len(server.requests) == 1 and waits == []


def test_client_retries_can_be_turned_off() -> None:
    server, waits = FlakyServer([(503, "1")]), []
    with server.client(waits, max_attempts=1) as client, pytest.raises(MetasentError) as raised:
        client.list_domains()
    assert raised.value.status == 503 and len(server.requests) == 1 and waits == []
    with pytest.raises(ValueError, match="max_attempts"):
        MetasentClient(max_attempts=0)


def test_cli_adapt_retries_a_503(tmp_path: Path) -> None:
    """``metasent adapt`` against a live server that answers 503 (Retry-After: 0) once: the command
    retries with the same Idempotency-Key and succeeds; with --attempts 1 it reports the 503."""
    keys: list[str | None] = []
    flaky = FastAPI()

    @flaky.post("/v1/domains", status_code=201)
    async def create(request: Request) -> Any:
        keys.append(request.headers.get("Idempotency-Key"))
        if len(keys) % 2 == 1:
            busy = {"code": "request_timeout", "message": "busy", "details": []}
            return JSONResponse({"error": busy}, status_code=503, headers={"Retry-After": "0"})
        return {"domain_id": "d" * 32, "name": "food"}

    examples = tmp_path / "support.jsonl"
    examples.write_text("\n".join(json.dumps(e) for e in support()) + "\n")
    with serve_in_thread(flaky) as url:
        adapted = runner.invoke(cli, ["adapt", "--server", url, "--name", "food", "--examples", str(examples)])
        assert adapted.exit_code == 0, adapted.output
        assert json.loads(adapted.output)["domain_id"] == "d" * 32
        assert len(keys) == 2 and keys[0] == keys[1] and keys[0]
        once = ["adapt", "--server", url, "--name", "food", "--examples", str(examples), "--attempts", "1"]
        failed = runner.invoke(cli, once)
    assert failed.exit_code == 1 and "503 request_timeout" in failed.output
