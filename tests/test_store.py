"""Durable domains on the tiny checkpoint: persistence across restarts, stale-checkpoint
re-adaptation, PUT examples (add/replace/version/409), stateless classify, the store itself."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from metasent.app.adaptation import refresh
from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.app.store import DomainWrite, SqlDomainStore, StoreUnavailableError, VersionConflictError
from metasent.meta.checkpoint import model_fingerprint
from metasent.meta.config import CheckpointConfig
from tests.conftest import TEXTS, assert_error, assert_same_scores, stored_domains, support


@contextmanager
def serve(checkpoint: Path, database_url: str, **settings: Any) -> Iterator[TestClient]:
    app = create_app(
        Settings(checkpoint=checkpoint, device="cpu", database_url=database_url, max_examples=30, **settings)
    )
    with TestClient(app) as client:
        yield client


def create(client: TestClient, examples: list[dict[str, str]] | None = None, name: str = "food") -> dict[str, Any]:
    response = client.post("/v1/domains", json={"name": name, "examples": examples or support()})
    assert response.status_code == 201, response.text
    return response.json()


def scores(client: TestClient, domain_id: str, texts: list[str] = TEXTS) -> list[dict[str, float]]:
    response = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    return [p["scores"] for p in response.json()["predictions"]]


def put(client: TestClient, domain_id: str, **body: Any):
    return client.put(f"/v1/domains/{domain_id}/examples", json=body)


def test_domains_survive_a_restart(tiny_checkpoint: Path, database_url: str) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        first, second = create(client), create(client, support("good", "bad"), "other")
        updated = put(client, second["domain_id"], examples=[{"text": "okay fine", "label": "meh"}]).json()
        before = {d["domain_id"]: scores(client, d["domain_id"]) for d in (first, second)}
        listed = client.get("/v1/domains").json()
    with serve(tiny_checkpoint, database_url) as client:  # a new process over the same data dir
        assert client.get("/v1/domains").json() == listed
        assert client.get(f"/v1/domains/{first['domain_id']}").json() == first
        assert client.get(f"/v1/domains/{second['domain_id']}").json() == updated
        assert updated["version"] == 2 and updated["labels"] == ["good", "bad", "meh"]
        for domain_id, expected in before.items():
            assert_same_scores(scores(client, domain_id), expected)
        assert stored_domains(client) == 2


def test_stale_domain_is_readapted_on_first_use(
    tiny_checkpoint: Path, modified_checkpoint: Path, database_url: str
) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        domain = create(client)
        untouched = create(client, name="untouched")
        old_scores = scores(client, domain["domain_id"])
    assert domain["adaptation"]["steps"] == 3 and domain["stale"] is False
    with serve(modified_checkpoint, database_url) as client:
        listed = {d["domain_id"]: d for d in client.get("/v1/domains").json()["domains"]}
        assert listed[domain["domain_id"]]["stale"] is True  # listing does not re-adapt
        assert listed[domain["domain_id"]]["checkpoint_hash"] == domain["checkpoint_hash"]
        fresh = client.get(f"/v1/domains/{domain['domain_id']}").json()
        assert fresh["stale"] is False and fresh["checkpoint_hash"] != domain["checkpoint_hash"]
        assert fresh["adaptation"]["steps"] == 2  # re-adapted with the new inner loop
        assert fresh["version"] == 1 and fresh["num_examples"] == 10  # same support set
        new_scores = scores(client, domain["domain_id"])
        assert new_scores != old_scores
        stale_by_classify = scores(client, untouched["domain_id"])
        assert client.get(f"/v1/domains/{untouched['domain_id']}").json()["adaptation"]["steps"] == 2
        assert_same_scores(stale_by_classify, new_scores)  # same support set, same model
    with serve(modified_checkpoint, database_url) as client:  # the new hash was recorded
        again = client.get(f"/v1/domains/{domain['domain_id']}").json()
        assert again == fresh
        assert_same_scores(scores(client, domain["domain_id"]), new_scores)


def test_readapt_on_load(tiny_checkpoint: Path, modified_checkpoint: Path, database_url: str) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        ids = [create(client)["domain_id"] for _ in range(2)]
    with serve(modified_checkpoint, database_url, readapt_on_load=True) as client:
        listed = client.get("/v1/domains").json()["domains"]
        assert sorted(d["domain_id"] for d in listed) == sorted(ids)
        assert all(d["stale"] is False and d["adaptation"]["steps"] == 2 for d in listed)


def test_put_examples_add_replace_and_versions(tiny_checkpoint: Path, database_url: str) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        domain = create(client)
        domain_id = domain["domain_id"]
        assert domain["version"] == 1 and domain["created_at"] == domain["updated_at"]
        added = put(client, domain_id, examples=[{"text": "okay fine average", "label": "neutral"}], mode="add")
        assert added.status_code == 200, added.text
        added = added.json()
        assert added["version"] == 2 and added["num_examples"] == 11
        assert added["labels"] == ["positive", "negative", "neutral"]
        assert added["updated_at"] > added["created_at"] == domain["created_at"]
        assert len(scores(client, domain_id)[0]) == 3
        stored = client.get(f"/v1/domains/{domain_id}/examples").json()
        assert stored["version"] == 2 and stored["examples"] == support() + [
            {"text": "okay fine average", "label": "neutral"}
        ]

        # a stale expected_version is refused and changes nothing
        conflict = put(client, domain_id, examples=support("bad", "good"), mode="replace", expected_version=1)
        error = assert_error(conflict, 409, "expected_version", "version_conflict")
        assert "version 2" in error["message"] and "expected_version=2" in error["details"][0]["fix"]
        assert client.get(f"/v1/domains/{domain_id}").json() == added

        replaced = put(client, domain_id, examples=support("bad", "good"), mode="replace", expected_version=2)
        assert replaced.status_code == 200, replaced.text
        replaced = replaced.json()
        assert replaced["version"] == 3 and replaced["num_examples"] == 10 and replaced["labels"] == ["bad", "good"]
        assert client.get(f"/v1/domains/{domain_id}/examples").json()["examples"] == support("bad", "good")
        assert set(scores(client, domain_id)[0]) == {"bad", "good"}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"examples": [{"text": "great", "label": "positive"}], "mode": "replace"}, 422, "examples"),
        ({"examples": [{"text": "great", "label": "positive"}] * 21}, 413, "examples"),
        ({"examples": []}, 422, "examples"),
        ({"examples": [{"text": "", "label": "x"}]}, 422, "examples[0].text"),
        ({"examples": [{"text": "great", "label": "x"}], "mode": "merge"}, 422, "mode"),
        ({"examples": [{"text": "great", "label": "x"}], "expected_version": 0}, 422, "expected_version"),
        ({"examples": [{"text": "great", "label": "x"}], "expected_version": "one"}, 422, "expected_version"),
        ({"examples": [{"text": "great", "label": "x"}], "extra": 1}, 422, "extra"),
        ({"mode": "add"}, 422, "examples"),
        ([], 422, "body"),
    ],
)
def test_put_examples_bad_input(tiny_checkpoint: Path, database_url: str, body: Any, status: int, field: str) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        domain = create(client)
        response = client.put(f"/v1/domains/{domain['domain_id']}/examples", json=body)
        assert_error(response, status, field)
        assert client.get(f"/v1/domains/{domain['domain_id']}").json() == domain
        assert_error(client.put("/v1/domains/unknown/examples", json={"examples": support()}), 404, "domain_id")


def test_stateless_classify_stores_nothing(tiny_checkpoint: Path, database_url: str) -> None:
    with serve(tiny_checkpoint, database_url) as client:
        response = client.post("/v1/classify", json={"examples": support(), "texts": TEXTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["labels"] == ["positive", "negative"] and len(body["predictions"]) == len(TEXTS)
        assert body["adaptation"]["steps"] == 3
        assert client.get("/v1/domains").json()["domains"] == []
        assert stored_domains(client) == 0
        # the same support set adapted as a stored domain classifies the same
        domain = create(client)
        assert_same_scores([p["scores"] for p in body["predictions"]], scores(client, domain["domain_id"]))
        for bad, status, field in [
            ({"examples": support()}, 422, "texts"),
            ({"texts": TEXTS}, 422, "examples"),
            ({"examples": support()[:5], "texts": TEXTS}, 422, "examples"),  # one label
            ({"examples": support(), "texts": ["great", ""]}, 422, "texts[1]"),
            ({"examples": support(), "texts": ["great"] * 513}, 413, "texts"),
            ({"examples": support() * 4, "texts": TEXTS}, 413, "examples"),
        ]:
            assert_error(client.post("/v1/classify", json=bad), status, field)
    with serve(tiny_checkpoint, database_url, max_texts=4) as client:
        assert_error(client.post("/v1/classify", json={"examples": support(), "texts": TEXTS}), 413, "texts")
        assert len(client.get("/v1/domains").json()["domains"]) == 1


def _adaptation(value: float) -> tuple[tuple[str, ...], dict[str, torch.Tensor], dict[str, Any]]:
    """Labels, tensors and figures of an adaptation whose head weight is filled with ``value``."""
    tensors = {"head.weight": torch.full((2, 3), value), "head.bias": torch.zeros(2)}
    return ("a", "b"), tensors, {"steps": 1, "seconds": 0.1, "device": "cpu"}


def _write(value: float, examples: list[tuple[str, str]], checkpoint_hash: str) -> DomainWrite:
    """:func:`_adaptation` of ``value`` on ``examples``, adapted with ``checkpoint_hash``."""
    return DomainWrite(*_adaptation(value), examples, checkpoint_hash)


def test_store_cache_versions_and_ping(database_url: str) -> None:
    store = SqlDomainStore(database_url, cache_size=1)
    examples = [("good", "a"), ("bad", "b")]
    domain = store.add("t1", "x", _write(1.0, examples, "hash1"))
    other = store.add("t1", "y", _write(2.0, examples, "hash1"))
    assert float(store.params(domain)["head.weight"][0, 0]) == 1.0  # evicted from the cache: read back
    assert store.get("t2", domain.domain_id) is None and store.list("t2") == [] and store.count("t1") == 2
    updated = store.replace(domain, _write(3.0, examples[:1] * 2 + examples, "hash1"))
    assert updated.version == 2 and updated.num_examples == 4
    with pytest.raises(VersionConflictError):
        store.replace(domain, _write(4.0, examples, "hash1"))  # based on version 1
    with pytest.raises(KeyError):
        store.params(domain)  # version 1 is gone
    assert float(store.params(updated)["head.weight"][0, 0]) == 3.0
    assert set(store.stale("hash2")) == {("t1", domain.domain_id), ("t1", other.domain_id)}
    assert store.stale("hash1") == []
    assert store.delete("t2", other.domain_id) is False and store.delete("t1", other.domain_id) is True
    assert len(store) == 1
    store.ping()
    store.close()
    reopened = SqlDomainStore(database_url)
    assert float(reopened.params(updated)["head.weight"][0, 0]) == 3.0
    if reopened.engine.dialect.name != "sqlite":
        return
    with reopened.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_an_unreachable_database_raises_store_unavailable(tmp_path: Path) -> None:
    """The store's own exception, with SQLAlchemy's error as its cause: nothing outside the store
    catches SQLAlchemy's (app.errors maps StoreUnavailableError to 503)."""
    store = SqlDomainStore(f"sqlite:///{tmp_path / 'gone' / 'db.sqlite'}")
    store.ping()
    store.engine.dispose()
    shutil.rmtree(tmp_path / "gone")
    calls = [
        store.ping,
        lambda: len(store),
        lambda: store.count("t1"),
        lambda: store.list("t1"),
        lambda: store.stale("h"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError, match="unable to open database") as raised:
            call()
        assert isinstance(raised.value.__cause__, OperationalError)


def test_model_fingerprint(tiny_checkpoint: Path, modified_checkpoint: Path, tmp_path: Path) -> None:
    config = CheckpointConfig.model_validate_json((tiny_checkpoint / "metasent.json").read_text())
    original = model_fingerprint(tiny_checkpoint, config)
    assert len(original) == 64 and original == model_fingerprint(
        shutil.copytree(tiny_checkpoint, tmp_path / "c"), config
    )
    assert model_fingerprint(modified_checkpoint, config) != original
    encoder = model_fingerprint(None, config, str(tiny_checkpoint))
    assert encoder != model_fingerprint(None, config.model_copy(update={"algorithm": "x"}), str(tiny_checkpoint))
    assert json.loads((tiny_checkpoint / "metasent.json").read_text())  # the checkpoint was not modified


def test_concurrent_writers_never_fail(database_url: str) -> None:
    """Writers that read first (count, get) must not hit 'database is locked' (SQLite) or deadlock."""
    from concurrent.futures import ThreadPoolExecutor

    store = SqlDomainStore(database_url)
    examples = [("good", "a"), ("bad", "b")]

    def work(i: int) -> None:
        for _ in range(15):
            domain = store.add(f"t{i % 2}", "x", _write(float(i), examples, "h"), limit=1000)
            store.replace(domain, _write(1.0, examples, "h"))
            assert store.delete(domain.tenant, domain.domain_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert len(store) == 0


class _Checkpoint:
    """A stand-in for :class:`metasent.app.service.ModelService` in :func:`refresh`: a checkpoint
    ``checkpoint_hash`` whose adaptations fill the head with ``value``; ``during`` runs inside each
    adaptation (a write of another replica landing while this one adapts) until it returns False."""

    def __init__(self, checkpoint_hash: str, value: float, during: Any = None) -> None:
        self.checkpoint_hash, self.value, self.during = checkpoint_hash, value, during
        self.adaptations = 0

    def adapt(self, texts: list[str], labels: list[str]) -> Any:
        self.adaptations += 1
        if self.during is not None and not self.during():
            self.during = None
        names, tensors, _ = _adaptation(self.value)
        return SimpleNamespace(labels=names, to_tensors=lambda: tensors)

    def info(self, state: Any, support_labels: Any) -> dict[str, Any]:
        return {"steps": 1, "seconds": 0.1, "device": "cpu"}


def test_readaptation_never_returns_another_checkpoints_tensors(database_url: str) -> None:
    """Two replicas on different checkpoints share a store: a write of replica A (on checkpoint
    hash-a) that lands while replica B re-adapts makes B read the domain again and re-adapt it
    on its own checkpoint; B never returns a domain whose stored tensors A adapted."""
    store = SqlDomainStore(database_url)
    examples = [("good", "a"), ("bad", "b")]
    domain = store.add("t1", "x", _write(1.0, examples, "hash-a"))

    def put_on_a() -> bool:  # replica A stores a new support set (version 2) on its checkpoint
        current = store.get("t1", domain.domain_id)
        assert current is not None
        store.replace(current, _write(5.0, [*examples, ("fine", "a")], "hash-a"))
        return False

    replica_b = _Checkpoint("hash-b", 2.0, during=put_on_a)
    fresh = refresh(replica_b, store, domain)  # type: ignore[arg-type]
    assert (fresh.checkpoint_hash, fresh.version, fresh.num_examples) == ("hash-b", 2, 3)
    assert replica_b.adaptations == 2  # the first adaptation lost, the stored support set re-adapted
    assert float(store.params(fresh)["head.weight"][0, 0]) == 2.0  # B's tensors, also as stored
    stored = store.get("t1", domain.domain_id, with_examples=True)
    assert stored is not None and stored.checkpoint_hash == "hash-b" and stored.examples == fresh.examples

    # replicas on two other checkpoints (hash-a, hash-c) re-adapt it while B re-adapts it, on every
    # attempt: B gives up with a version conflict (the API's 409) instead of answering with theirs
    def readapt_on_a() -> bool:
        current = store.get("t1", domain.domain_id)
        assert current is not None
        other = "hash-a" if current.checkpoint_hash != "hash-a" else "hash-c"
        store.replace(current, _write(1.0, [*examples, ("fine", "a")], other), bump_version=False)
        return True

    stale = store.get("t1", domain.domain_id)
    assert stale is not None
    store.replace(stale, _write(1.0, [*examples, ("fine", "a")], "hash-a"), bump_version=False)
    busy_b = _Checkpoint("hash-b", 2.0, during=readapt_on_a)
    with pytest.raises(VersionConflictError):
        refresh(busy_b, store, store.get("t1", domain.domain_id))  # type: ignore[arg-type]
    assert busy_b.adaptations == 3
    assert store.get("t1", domain.domain_id).checkpoint_hash != "hash-b"  # type: ignore[union-attr]
