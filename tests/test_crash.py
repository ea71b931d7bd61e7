"""Crash safety: ``metasent serve`` killed with SIGKILL during an adaptation (another one waiting
in the adaptation queue) and in the middle of a write transaction (insert and update) loses no
acknowledged domain and shows no half-written one. The servers (``Server`` in tests/conftest.py)
run through the test-only launcher tests/fault_server.py: the mid-write kill is made
deterministic by FAULT_WRITE_DELAY_S (sleeps inside the write transaction, after the row is
written, before the commit) and the mid-adaptation one by FAULT_ADAPT_DELAY_S (sleeps after
the inner loop, before the write).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load as load_tensors

from tests.conftest import TEXTS, assert_same_scores, server, support

pytestmark = pytest.mark.slow


def _scores(client: httpx.Client, domain_id: str) -> list[dict[str, float]]:
    response = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    return [p["scores"] for p in response.json()["predictions"]]


def _acknowledge(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """Create 3 domains and update one; every answer is an acknowledgement."""
    domains = {}
    for i, (pos, neg) in enumerate([("positive", "negative"), ("good", "bad"), ("yes", "no")]):
        response = client.post("/v1/domains", json={"name": f"acked-{i}", "examples": support(pos, neg, k=4 + i)})
        assert response.status_code == 201, response.text
        domains[response.json()["domain_id"]] = response.json()
    first = next(iter(domains))
    response = client.put(f"/v1/domains/{first}/examples", json={"examples": [{"text": "okay", "label": "meh"}]})
    assert response.status_code == 200 and response.json()["version"] == 2, response.text
    domains[first] = response.json()
    return domains


def _check_database(path: Path, expected: set[str]) -> None:
    """The SQLite file is consistent and holds exactly the acknowledged domains, each loadable."""
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = connection.execute("SELECT domain_id, name, params, examples FROM domains").fetchall()
    assert {row[0] for row in rows} == expected, [row[1] for row in rows]
    for _, _, blob, examples in rows:
        assert load_tensors(blob) and examples


def test_sigkill_during_adaptation_and_writes_loses_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with server(tiny_checkpoint, data_dir, tmp_path / "0-acknowledge.log") as srv:
        acked = _acknowledge(srv.client)
        expected = {domain_id: _scores(srv.client, domain_id) for domain_id in acked}
        srv.kill()  # straight after the acknowledgements
    first, second, _ = acked

    # (a) killed during an adaptation (a new domain), with an update of an existing domain waiting
    # behind it in the adaptation queue (one adaptation runs at a time)
    with server(tiny_checkpoint, data_dir, tmp_path / "a-adapt.log", FAULT_ADAPT_DELAY_S="60") as srv:
        srv.in_background("POST", "/v1/domains", {"name": "killed-adapting", "examples": support()})
        srv.wait_for_log("test adapt delay")
        srv.in_background("PUT", f"/v1/domains/{second}/examples", {"examples": support("x", "y"), "mode": "replace"})
        srv.wait_for_queue_depth(2)
        srv.kill()

    # (b) killed inside a write transaction, after the row is written and before the commit
    for name, method, path, body in [
        ("b-insert", "POST", "/v1/domains", {"name": "killed-writing", "examples": support()}),
        ("b-update", "PUT", f"/v1/domains/{first}/examples", {"examples": support("x", "y"), "mode": "replace"}),
    ]:
        with server(tiny_checkpoint, data_dir, tmp_path / f"{name}.log", FAULT_WRITE_DELAY_S="60") as srv:
            srv.in_background(method, path, body)
            srv.wait_for_log("test write delay")
            srv.kill()

    _check_database(data_dir / "metasent.db", set(acked))
    with server(tiny_checkpoint, data_dir, tmp_path / "verify.log") as srv:
        listed = srv.client.get("/v1/domains").json()["domains"]
        assert {d["domain_id"]: d for d in listed} == acked  # same versions, labels, hashes, times
        for domain_id, scores in expected.items():
            assert_same_scores(_scores(srv.client, domain_id), scores)
        examples = srv.client.get(f"/v1/domains/{first}/examples").json()
        assert examples["version"] == 2 and examples["examples"][-1] == {"text": "okay", "label": "meh"}
