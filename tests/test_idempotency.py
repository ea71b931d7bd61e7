"""``Idempotency-Key`` on ``POST /v1/domains`` and ``PUT /v1/domains/{id}/examples``: a retry with
the same key and body gets the first answer and writes nothing; the same key with another body is
422; a write that answered 503 (timeout during the final write) is found by its retry; concurrent
requests with one key (one app, or two stores on one database) make exactly one domain; keys
expire. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.app.store import (
    DomainWrite,
    IdempotencyKey,
    IdempotencyMismatchError,
    IdempotentReplayError,
    SqlDomainStore,
)
from tests.conftest import AdaptationGate, assert_error, request_timeout, running, support, wait_until


def _settings(checkpoint: Path, database_url: str, **overrides: Any) -> Settings:
    return Settings(checkpoint=checkpoint, device="cpu", database_url=database_url, **overrides)


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def test_replay_after_the_domain_was_deleted_answers_409(tiny_checkpoint: Path, database_url: str) -> None:
    """A retry never hands out a deleted domain's id as if it existed (it answered 201 with it)."""
    with TestClient(create_app(_settings(tiny_checkpoint, database_url))) as client:
        key, put_key, body = _key(), _key(), {"name": "food", "examples": support()}
        domain_id = client.post("/v1/domains", json=body, headers=key).json()["domain_id"]
        put = {"examples": [{"text": "okay fine", "label": "neutral"}]}
        assert client.put(f"/v1/domains/{domain_id}/examples", json=put, headers=put_key).status_code == 200
        assert client.delete(f"/v1/domains/{domain_id}").status_code == 204
        again = client.post("/v1/domains", json=body, headers=key)
        assert domain_id in assert_error(again, 409, "Idempotency-Key", "idempotent_domain_deleted")["message"]
        retried_put = client.put(f"/v1/domains/{domain_id}/examples", json=put, headers=put_key)
        assert_error(retried_put, 409, "Idempotency-Key", "idempotent_domain_deleted")
        assert client.get("/v1/domains").json()["domains"] == []  # nothing was written again
        assert client.post("/v1/domains", json=body, headers=_key()).status_code == 201  # a new key writes


def test_retries_get_the_first_answer(tiny_checkpoint: Path, database_url: str) -> None:
    with TestClient(create_app(_settings(tiny_checkpoint, database_url))) as client:
        key, body = _key(), {"name": "food", "examples": support()}
        first = client.post("/v1/domains", json=body, headers=key)
        again = client.post("/v1/domains", json=body, headers=key)
        assert first.status_code == again.status_code == 201, again.text
        assert again.json() == first.json() and again.headers["Location"] == first.headers["Location"]
        assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
        assert [d["domain_id"] for d in client.get("/v1/domains").json()["domains"]] == [first.json()["domain_id"]]
        # the same key with another body, method or path: 422 naming the header; nothing written
        other = client.post("/v1/domains", json={**body, "name": "drinks"}, headers=key)
        assert_error(other, 422, "Idempotency-Key", "idempotency_key_reused")
        domain_id = first.json()["domain_id"]
        put = {"examples": [{"text": "okay fine", "label": "neutral"}], "mode": "add"}
        assert_error(client.put(f"/v1/domains/{domain_id}/examples", json=put, headers=key), 422, "Idempotency-Key")
        for bad in ["", "x" * 256, "caf\u00e9".encode("latin-1"), "a b"]:
            response = client.post("/v1/domains", json=body, headers={"Idempotency-Key": bad})
            assert_error(response, 422, "Idempotency-Key")
        assert len(client.get("/v1/domains").json()["domains"]) == 1
        # PUT: an "add" retried is applied once
        put_key = _key()
        updated = client.put(f"/v1/domains/{domain_id}/examples", json=put, headers=put_key)
        retried = client.put(f"/v1/domains/{domain_id}/examples", json=put, headers=put_key)
        assert updated.status_code == retried.status_code == 200, retried.text
        assert retried.json() == updated.json() and updated.json()["version"] == 2
        stored = client.get(f"/v1/domains/{domain_id}/examples").json()
        assert stored["version"] == 2 and len(stored["examples"]) == 11
        # without a key, every request is its own write
        assert client.post("/v1/domains", json=body).json()["domain_id"] != domain_id
        # keys belong to a tenant: the OpenAPI document declares the header on both writes
        spec = client.get("/openapi.json").json()["paths"]
        for path, method in [("/v1/domains", "post"), ("/v1/domains/{domain_id}/examples", "put")]:
            assert "Idempotency-Key" in [p["name"] for p in spec[path][method]["parameters"]]


def test_a_timed_out_create_is_found_by_its_retry(tiny_checkpoint: Path, database_url: str) -> None:
    """The 503-but-stored case: the request times out while its final write runs; the write
    commits; the client's retry with the same key gets the stored domain, not a second one."""
    # no accuracy estimate: the adaptation (5 more inner loops with it) stays well inside the 1 s limit
    app = create_app(_settings(tiny_checkpoint, database_url, request_timeout_s=60, estimate=False))

    async def scenario() -> None:
        async with running(app) as client:
            store = app.state.store
            gate = AdaptationGate()
            store.add = gate.wrap(store.add)  # the final write waits until released
            key, body = _key(), {"name": "food", "examples": support()}
            with request_timeout(app, 1.0):
                response = await client.post("/v1/domains", json=body, headers=key)
            assert_error(response, 503, "server", "request_timeout")
            assert gate.entered == 1 and gate.finished == 0  # answered while the write waits
            gate.release()
            await wait_until(lambda: gate.finished == 1, "the write to commit")
            retried = await client.post("/v1/domains", json=body, headers=key)
            assert retried.status_code == 201 and retried.headers["Idempotent-Replayed"] == "true"
            listed = (await client.get("/v1/domains")).json()["domains"]
            assert [d["domain_id"] for d in listed] == [retried.json()["domain_id"]]
            assert gate.entered == 1  # the retry wrote nothing

    asyncio.run(scenario())


def test_concurrent_requests_with_one_key_make_one_domain(tiny_checkpoint: Path, database_url: str) -> None:
    app = create_app(_settings(tiny_checkpoint, database_url))

    async def scenario() -> None:
        async with running(app) as client:
            key, body = _key(), {"name": "food", "examples": support()}
            answers = await asyncio.gather(*(client.post("/v1/domains", json=body, headers=key) for _ in range(6)))
            assert {r.status_code for r in answers} == {201}, [r.text for r in answers]
            assert len({r.json()["domain_id"] for r in answers}) == 1
            assert len((await client.get("/v1/domains")).json()["domains"]) == 1

    asyncio.run(scenario())


def _add(store: SqlDomainStore, key: IdempotencyKey | None, tenant: str = "t1", limit: int | None = None):
    tensors = {"head.weight": torch.ones(2, 3), "head.bias": torch.zeros(2)}
    write = DomainWrite(("a", "b"), tensors, {}, [("good", "a"), ("bad", "b")], "h")
    return store.add(tenant, "x", write, limit=limit, idempotency=key)


def test_two_stores_one_key_one_domain(database_url: str) -> None:
    """Two stores (two replicas) on one database, 8 threads each writing with one key."""
    stores = [SqlDomainStore(database_url), SqlDomainStore(database_url)]
    key = IdempotencyKey("k-1", "a" * 64, 201, 3600)
    results: list[str] = []
    errors: list[BaseException] = []

    def write(store: SqlDomainStore) -> None:
        try:
            results.append(_add(store, key).domain_id)
        except IdempotentReplayError as replay:
            results.append(replay.body["domain_id"])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(stores[i % 2],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == 16 and len(set(results)) == 1 and len(stores[0]) == 1
    assert stores[1].answer("t1", key) == (201, stores[0].answer("t1", key)[1])  # type: ignore[index]
    assert stores[0].answer("t2", key) is None  # keys are per tenant
    with pytest.raises(IdempotencyMismatchError):
        stores[0].answer("t1", IdempotencyKey("k-1", "b" * 64, 201, 3600))
    for store in stores:
        store.close()


def test_keys_expire(database_url: str) -> None:
    store = SqlDomainStore(database_url)
    expired = IdempotencyKey("k-2", "a" * 64, 201, 0)  # kept 0 s: expired once written
    first = _add(store, expired)
    assert store.answer("t1", expired) is None
    second = _add(store, expired)  # the key is free again: a new write
    assert second.domain_id != first.domain_id and len(store) == 2
    kept = IdempotencyKey("k-3", "a" * 64, 201, 3600)
    _add(store, kept)
    with pytest.raises(IdempotentReplayError):
        _add(store, kept)
    store.close()


def test_quota_holds_under_concurrent_creates(database_url: str) -> None:
    """24 threads over two stores (two replicas) create domains for one tenant with limit 5: exactly
    5 are stored, the rest refused (the count and the insert run under the tenant's lock)."""
    from metasent.app.store import DomainLimitError

    stores = [SqlDomainStore(database_url), SqlDomainStore(database_url)]
    outcomes: list[str] = []
    start = threading.Barrier(24)

    def create(store: SqlDomainStore) -> None:
        start.wait(timeout=30)
        try:
            _add(store, None, tenant="quota", limit=5)
            outcomes.append("stored")
        except DomainLimitError:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(stores[i % 2],)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["refused"] * 19 + ["stored"] * 5
    assert stores[0].count("quota") == stores[1].count("quota") == 5
    for store in stores:
        store.close()
