"""The production features together: the bounded adaptation queue in front of every adaptation a
request can trigger (create, PUT examples, stateless classify, a stale domain's first use), the
request timeout over the durable store, the public operations routes on a server with API keys,
and /readyz, /healthz and /metrics over the real SQL store."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.app.store import SqlDomainStore
from tests.conftest import (
    NEGATIVE,
    POSITIVE,
    WORDS,
    assert_error,
    gated_adaptations,
    metric,
    request_timeout,
    running,
    support,
    wait_until,
)

KEY_A, KEY_B = "prod-key-a-0123456789", "prod-key-b-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def settings(checkpoint: Path, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(checkpoint=checkpoint, device="cpu", data_dir=data_dir, **overrides)


def test_every_adaptation_path_goes_through_the_queue(
    tiny_checkpoint: Path, modified_checkpoint: Path, tmp_path: Path
) -> None:
    with TestClient(create_app(settings(tiny_checkpoint, tmp_path))) as client:  # adapted with the old checkpoint
        stale_id = client.post("/v1/domains", json={"name": "old", "examples": support()}).json()["domain_id"]
    app = create_app(settings(modified_checkpoint, tmp_path, adapt_queue_size=1))

    async def scenario() -> None:
        async with running(app) as client:
            fresh = await client.post("/v1/domains", json={"name": "fresh", "examples": support()})
            assert fresh.status_code == 201, fresh.text
            fresh_id = fresh.json()["domain_id"]
            with gated_adaptations(app) as gate:
                blocker = asyncio.create_task(client.post("/v1/domains", json={"name": "b", "examples": support()}))
                await wait_until(lambda: gate.entered == 1, "the blocker's adaptation to start")
                assert app.state.adapt_queue.depth == 1  # the one slot is taken
                refused = {
                    "create": await client.post("/v1/domains", json={"name": "x", "examples": support()}),
                    "put": await client.put(f"/v1/domains/{fresh_id}/examples", json={"examples": support()}),
                    "stateless": await client.post("/v1/classify", json={"examples": support(), "texts": ["great"]}),
                    "stale get": await client.get(f"/v1/domains/{stale_id}"),
                    "stale classify": await client.post(f"/v1/domains/{stale_id}/classify", json={"texts": ["great"]}),
                }
                retry_after = str(app.state.adapt_queue.retry_after())  # the queue's estimate, held steady
                for name, response in refused.items():
                    assert_error(response, 429, "server", "adaptation_queue_full")
                    assert response.headers["Retry-After"] == retry_after, name
                # what needs no adaptation is served meanwhile: a fresh domain, the list, the examples
                served = await client.post(f"/v1/domains/{fresh_id}/classify", json={"texts": ["great"]})
                assert served.status_code == 200, served.text
                listed = {d["domain_id"]: d for d in (await client.get("/v1/domains")).json()["domains"]}
                assert listed[stale_id]["stale"] is True and listed[fresh_id]["version"] == 1  # nothing changed
                assert (await client.get(f"/v1/domains/{stale_id}/examples")).status_code == 200
                assert gate.entered == 1 and not blocker.done()  # all of the above while the slot was taken
                gate.release()
                assert (await blocker).status_code == 201
            assert app.state.adapt_queue.depth == 0

            # the queue free again, each path runs (and the stale domain is re-adapted on first use)
            refreshed = await client.get(f"/v1/domains/{stale_id}")
            assert refreshed.status_code == 200 and refreshed.json()["stale"] is False
            updated = await client.put(f"/v1/domains/{fresh_id}/examples", json={"examples": support()})
            assert updated.status_code == 200 and updated.json()["version"] == 2
            body = {"examples": support(), "texts": [POSITIVE[9], NEGATIVE[9]]}
            assert (await client.post("/v1/classify", json=body)).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "metasent_adaptation_seconds_count") == 5  # fresh, blocker, 3 above

    asyncio.run(scenario())


def test_timed_out_put_stores_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # 1 s: ample for the handler to reach the adaptation, which the gate then holds past the limit
    app = create_app(settings(tiny_checkpoint, tmp_path, request_timeout_s=1.0))

    async def scenario() -> None:
        async with running(app) as client:
            with request_timeout(app, 60):  # only the PUT below is to time out
                domain = (await client.post("/v1/domains", json={"name": "food", "examples": support()})).json()
            body = {"examples": support("good", "bad"), "mode": "replace"}
            with gated_adaptations(app) as gate:
                response = await client.put(f"/v1/domains/{domain['domain_id']}/examples", json=body)
                assert_error(response, 503, "server", "request_timeout")
                assert response.headers["Retry-After"] == str(app.state.adapt_queue.retry_after())
                assert gate.entered == 1 and gate.finished == 0  # answered while its adaptation still runs
                gate.release()  # the adaptation finishes in its thread; its result is dropped
                await wait_until(
                    lambda: gate.finished == 1 and app.state.adapt_queue.depth == 0, "the adaptation to finish"
                )
            with request_timeout(app, 60):
                assert (await client.get(f"/v1/domains/{domain['domain_id']}")).json() == domain
                stored = (await client.get(f"/v1/domains/{domain['domain_id']}/examples")).json()
                assert stored["version"] == 1 and stored["examples"] == support()
                retried = await client.put(f"/v1/domains/{domain['domain_id']}/examples", json=body)
                assert retried.status_code == 200 and retried.json()["labels"] == ["good", "bad"]

    asyncio.run(scenario())


def test_stateless_classify_flags_truncated_texts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings(tiny_checkpoint, tmp_path))) as client:
        limit = client.app.state.service.model.max_length()  # type: ignore[attr-defined]
        fits, over = " ".join(WORDS[: limit - 2]), " ".join(WORDS[: limit - 1])  # + [CLS] and [SEP]
        response = client.post("/v1/classify", json={"examples": support(), "texts": ["great", fits, over]})
        assert response.status_code == 200, response.text
        assert [p["truncated"] for p in response.json()["predictions"]] == [False, False, True]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "truncated" in schema["Prediction"]["properties"]


def test_ops_routes_need_a_key_and_count_every_tenant(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings(tiny_checkpoint, tmp_path, api_keys=f"{KEY_A},{KEY_B}"))) as client:
        for headers in (A, A, B):
            created = client.post("/v1/domains", json={"name": "food", "examples": support()}, headers=headers)
            assert created.status_code == 201, created.text
        assert client.get("/v1/domains").status_code == 401
        assert len(client.get("/v1/domains", headers=B).json()["domains"]) == 1
        # /healthz and /readyz need no key and show no tenant figures; /metrics (every tenant's) needs a key
        assert "domains" not in client.get("/healthz").json()
        assert client.get("/readyz").json() == {"status": "ready", "model_loaded": True, "store_reachable": True}
        assert_error(client.get("/metrics"), 401, "Authorization", "missing_api_key")
        metrics = client.get("/metrics", headers=B)
        assert metrics.status_code == 200
        assert metric(metrics.text, "metasent_domains") == 3
        unauthorised = 'metasent_http_requests_total{method="GET",route="/v1/domains",status="401"}'
        assert metric(metrics.text, unauthorised) == 1
        spec = client.get("/openapi.json", headers=A).json()
        for path in ("/healthz", "/readyz"):
            assert "security" not in spec["paths"][path]["get"], path
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"ApiKey": []}]


def test_readyz_and_gauges_when_the_real_store_is_down(tiny_checkpoint: Path, tmp_path: Path) -> None:
    app = create_app(settings(tiny_checkpoint, tmp_path / "data"))

    async def scenario() -> None:
        async with running(app) as client:
            await client.post("/v1/domains", json={"name": "food", "examples": support()})
            assert (await client.get("/readyz")).status_code == 200
            store: SqlDomainStore = app.state.store
            store.engine.dispose()
            shutil.move(tmp_path / "data", tmp_path / "moved")  # the database file is gone
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["store_reachable"] is False
            health = await client.get("/healthz")  # liveness does not depend on the store
            assert health.status_code == 200 and health.json()["status"] == "ok"
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and math.isnan(metric(metrics.text, "metasent_domains"))
            for response in (
                await client.get("/v1/domains"),
                await client.post("/v1/domains", json={"name": "food", "examples": support()}),
            ):
                assert_error(response, 503, "server", "store_unavailable")
                assert response.headers["Retry-After"] == "5"
            shutil.move(tmp_path / "moved", tmp_path / "data")
            assert (await client.get("/readyz")).status_code == 200
            assert len((await client.get("/v1/domains")).json()["domains"]) == 1  # nothing was lost

    asyncio.run(scenario())


def test_client_gone_while_queued_leaves_the_queue(tiny_checkpoint: Path, tmp_path: Path) -> None:
    app = create_app(settings(tiny_checkpoint, tmp_path, adapt_queue_size=2))

    async def scenario() -> None:
        async with running(app) as client:
            with gated_adaptations(app) as gate:
                first = asyncio.create_task(client.post("/v1/domains", json={"name": "a", "examples": support()}))
                await wait_until(lambda: gate.entered == 1, "the first adaptation to start")
                queued = asyncio.create_task(client.post("/v1/classify", json={"examples": support(), "texts": ["x"]}))
                await wait_until(lambda: app.state.adapt_queue.depth == 2, "the classify request to queue")
                queued.cancel()
                try:
                    await queued
                except (asyncio.CancelledError, httpx.HTTPError):
                    pass
                await wait_until(lambda: app.state.adapt_queue.depth == 1, "the cancelled request to leave the queue")
                gate.release()
                assert (await first).status_code == 201
                # the next adaptation runs after the abandoned one's turn: that one was skipped, never run
                after = await client.post("/v1/classify", json={"examples": support(), "texts": ["x"]})
                assert after.status_code == 200 and gate.entered == 2
                assert app.state.adapt_queue.depth == 0

    asyncio.run(scenario())
