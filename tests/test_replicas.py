"""Replicas on one PostgreSQL database: ``metasent serve`` processes (tests/conftest.py ``Server``,
on the tiny checkpoint) share a fresh schema of :data:`tests.conftest.POSTGRES_URL`. They start at
the same time, so their start-up migrations run concurrently. The tests show that a domain adapted
on one replica classifies identically on another, that concurrent writes across replicas keep the
version check and the per-tenant quota, that a replica killed with SIGKILL mid-write loses nothing
it acknowledged while the other keeps serving, and that replicas on different checkpoints never
serve each other's adapted tensors. Each test uses its own API key (its own tenant), so tests
sharing the module's replicas do not count each other's domains. Fails, never skips, without a
PostgreSQL server (``scripts/setup.sh`` starts one).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TEXTS, Server, assert_same_scores, database, support

pytestmark = pytest.mark.slow
LIMIT = 3  # METASENT_MAX_DOMAINS_PER_TENANT of every replica
WRITE_DELAY_S = 0.3  # the module's replicas hold each write transaction open this long (fault_server)
KEYS = {test: f"replica-{test}-key" for test in ("same", "put", "quota", "kill", "other", "checkpoints")}


def _settings(url: str) -> dict[str, str]:
    return {
        "METASENT_DATABASE_URL": url,
        "METASENT_API_KEYS": ",".join(KEYS.values()),
        "METASENT_MAX_DOMAINS_PER_TENANT": str(LIMIT),
    }


def _gate(server: Server) -> Path:
    """The file that holds ``server``'s adaptations while it exists (FAULT_ADAPT_GATE)."""
    return server.log.with_suffix(".gate")


@contextmanager
def _replicas(checkpoints: list[Path], url: str, directory: Path, **env: str) -> Iterator[list[Server]]:
    """One server per checkpoint on database ``url``, all started before any is waited on (their
    migrations race), each killed on exit; each one's adaptations wait while its :func:`_gate`
    file exists."""
    with ExitStack() as stack:
        servers = []
        for i, checkpoint in enumerate(checkpoints):
            data_dir = directory / f"replica-{i}"
            data_dir.mkdir()
            log = directory / f"replica-{i}.log"
            gate = str(log.with_suffix(".gate"))
            started = Server(checkpoint, data_dir, log, wait=False, FAULT_ADAPT_GATE=gate, **_settings(url), **env)
            stack.callback(lambda s=started: s.process.poll() is None and s.kill())
            servers.append(started)
        for started in servers:
            started.wait_ready()
        yield servers


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh PostgreSQL schema shared by the module's replicas."""
    with database("postgresql", tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(scope="module")
def replicas(
    tiny_checkpoint: Path, modified_checkpoint: Path, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """Replicas A and B on the tiny checkpoint and C on the modified one (same weights, a 2-step
    inner loop: another checkpoint hash), started together on one empty schema. Every write
    transaction stays open :data:`WRITE_DELAY_S` before its commit, so concurrent writes of two
    replicas overlap in the database instead of passing one after the other."""
    directory = tmp_path_factory.mktemp("replicas")
    checkpoints = [tiny_checkpoint, tiny_checkpoint, modified_checkpoint]
    with _replicas(checkpoints, postgres_url, directory, FAULT_WRITE_DELAY_S=str(WRITE_DELAY_S)) as servers:
        yield servers


def _clients(servers: list[Server], test: str) -> Iterator[httpx.Client]:
    return (server.session(KEYS[test]) for server in servers)


def _create(client: httpx.Client, examples: list[dict[str, str]] | None = None, name: str = "food") -> dict[str, Any]:
    response = client.post("/v1/domains", json={"name": name, "examples": examples or support()})
    assert response.status_code == 201, response.text
    return response.json()


def _scores(client: httpx.Client, domain_id: str) -> list[dict[str, float]]:
    response = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    return [p["scores"] for p in response.json()["predictions"]]


def _listed(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/domains")
    assert response.status_code == 200, response.text
    return {d["domain_id"]: d for d in response.json()["domains"]}


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run every call in its own thread, all released together by a barrier; their results."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_a_domain_adapted_on_one_replica_classifies_identically_on_another(replicas: list[Server]) -> None:
    migrated = [r for r in replicas if "database schema upgraded: None -> " in r.log.read_text()]
    assert len(migrated) == 1  # the replicas started together; one migrated, the others waited for it
    a, b, _ = _clients(replicas, "same")
    domain = _create(a)
    on_a = _scores(a, domain["domain_id"])
    assert_same_scores(_scores(b, domain["domain_id"]), on_a)  # within 1e-6 per score
    assert b.get(f"/v1/domains/{domain['domain_id']}").json() == domain  # not stale, nothing re-adapted
    assert _listed(a) == _listed(b) == {domain["domain_id"]: domain}


def test_concurrent_puts_with_one_expected_version_one_wins(replicas: list[Server]) -> None:
    a, b, _ = _clients(replicas, "put")
    domain_id = _create(a)["domain_id"]
    bodies = [
        {"examples": support("good", "bad", k=3), "mode": "replace", "expected_version": 1},
        {"examples": support("yes", "no", k=4), "mode": "replace", "expected_version": 1},
    ]
    path = f"/v1/domains/{domain_id}/examples"
    answers = _at_once([lambda c=c, body=body: c.put(path, json=body) for c, body in zip((a, b), bodies, strict=True)])
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    won = next(i for i, r in enumerate(answers) if r.status_code == 200)
    winner, loser = answers[won], answers[1 - won]
    assert winner.json()["version"] == 2 and loser.json()["error"]["code"] == "version_conflict"
    for client in (a, b):
        stored = client.get(path).json()
        assert stored["version"] == 2 and stored["examples"] == bodies[won]["examples"]
        assert client.get(f"/v1/domains/{domain_id}").json() == winner.json()
    assert_same_scores(_scores(a, domain_id), _scores(b, domain_id))


def test_concurrent_creates_across_replicas_never_pass_the_quota(replicas: list[Server]) -> None:
    a, b, _ = _clients(replicas, "quota")
    creates = [
        lambda c=client, i=i: c.post("/v1/domains", json={"name": f"quota-{i}", "examples": support()})
        for i, client in enumerate([a, b] * 4)
    ]
    answers = _at_once(creates)
    statuses = Counter(r.status_code for r in answers)
    assert statuses[201] == LIMIT and set(statuses) <= {201, 409, 422}, [r.text for r in answers]
    for refused in (r for r in answers if r.status_code != 201):
        assert refused.json()["error"]["code"] in {"too_many_domains", "version_conflict"}, refused.text
    created = {r.json()["domain_id"] for r in answers if r.status_code == 201}
    assert set(_listed(a)) == set(_listed(b)) == created  # no extra domain stored


def test_replicas_on_different_checkpoints_never_serve_each_others_tensors(replicas: list[Server]) -> None:
    """A (tiny checkpoint) and C (modified: another hash, a 2-step inner loop) share the store: a
    domain A adapted is re-adapted by C from its stored support set on first use, and by A again
    when A uses it next; each always answers with its own checkpoint's adaptation, also when both
    classify it at the same time."""
    a, _, c = _clients(replicas, "checkpoints")
    domain = _create(a)
    own_a = _scores(a, domain["domain_id"])
    reference = _create(c)  # the same support set adapted directly on C
    own_c = _scores(c, reference["domain_id"])
    assert own_c != own_a  # the checkpoints really adapt differently

    assert_same_scores(_scores(c, domain["domain_id"]), own_c)  # re-adapted on C, not A's tensors
    on_c = c.get(f"/v1/domains/{domain['domain_id']}").json()
    assert on_c["checkpoint_hash"] == reference["checkpoint_hash"] != domain["checkpoint_hash"]
    assert on_c["stale"] is False and on_c["version"] == 1 and on_c["adaptation"]["steps"] == 2
    replicas[2].wait_for_log(f"re-adapted stale domain {domain['domain_id']}")
    assert a.get("/v1/domains").json()["domains"][0]["stale"] is True  # A sees C's adaptation as stale

    assert_same_scores(_scores(a, domain["domain_id"]), own_a)  # and A re-adapts it back
    assert a.get(f"/v1/domains/{domain['domain_id']}").json()["checkpoint_hash"] == domain["checkpoint_hash"]
    for _ in range(3):  # both use it at once: each re-adaptation races the other replica's
        on_a, on_c = _at_once([lambda: _scores(a, domain["domain_id"]), lambda: _scores(c, domain["domain_id"])])
        assert_same_scores(on_a, own_a)
        assert_same_scores(on_c, own_c)

    # A stores a new support set (version 2, adapted on A) while C re-adapts version 1: C's write
    # loses, and C answers with its own adaptation of version 2, never A's tensors of version 2
    assert a.get(f"/v1/domains/{domain['domain_id']}").json()["checkpoint_hash"] == domain["checkpoint_hash"]
    gate = _gate(replicas[2])
    with ThreadPoolExecutor(1) as held:
        gate.touch()
        try:
            on_c_future = held.submit(_scores, c, domain["domain_id"])
            replicas[2].wait_for_log("test adapt gate")  # C adapted version 1 and waits to store it
            put = a.put(
                f"/v1/domains/{domain['domain_id']}/examples",
                json={"examples": support("good", "bad"), "mode": "replace", "expected_version": 1},
            )
            assert put.status_code == 200 and put.json()["version"] == 2, put.text
        finally:
            gate.unlink()
        new_on_c = on_c_future.result(timeout=60)
    new_reference = _create(c, support("good", "bad"), "reference-2")  # version 2's support set, on C
    assert_same_scores(new_on_c, _scores(c, new_reference["domain_id"]))
    assert new_on_c != _scores(a, domain["domain_id"])  # which is A's adaptation of version 2
    stored = a.get(f"/v1/domains/{domain['domain_id']}").json()
    assert stored["version"] == 2 and stored["labels"] == ["good", "bad"]


class _Traffic:
    """Classify requests sent to one replica back to back in a thread, until :meth:`stop`."""

    def __init__(self, client: httpx.Client, domain_id: str) -> None:
        self.answers: list[tuple[float, int]] = []  # (monotonic time answered, status)
        self.error: str | None = None  # the last transport error
        self._stop = threading.Event()
        self._client, self._domain_id = client, domain_id
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self._client.post(f"/v1/domains/{self._domain_id}/classify", json={"texts": TEXTS}).status_code
            except httpx.HTTPError as error:
                status = -1
                self.error = repr(error)
            self.answers.append((time.monotonic(), status))

    def answered_after(self, moment: float, count: int, timeout: float = 30) -> None:
        """Until ``count`` requests were answered after ``moment``."""
        deadline = time.monotonic() + timeout
        while sum(1 for at, _ in self.answers if at > moment) < count:
            assert self._thread.is_alive() and time.monotonic() < deadline, self.answers
            time.sleep(0.05)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(timeout=60)
        return [status for _, status in self.answers]


def test_a_replica_killed_mid_write_loses_nothing_and_the_other_keeps_serving(
    replicas: list[Server], tiny_checkpoint: Path, postgres_url: str, tmp_path: Path
) -> None:
    """Replica F (its own process, on the module's database) acknowledges two creates, then is
    killed with SIGKILL inside the third create's write transaction (the row written, the commit
    not yet: FAULT_WRITE_DELAY_S after FAULT_WRITE_DELAY_AFTER=2 commits). Replica B serves
    classify requests the whole time, takes writes of another tenant while F holds its tenant's
    lock, and afterwards finds both acknowledged domains intact and not the killed one; the
    client's retry with the same Idempotency-Key then creates it once."""
    (tmp_path / "data").mkdir()
    env = {"FAULT_WRITE_DELAY_S": "60", "FAULT_WRITE_DELAY_AFTER": "2", **_settings(postgres_url)}
    with ExitStack() as cleanup:
        fault = Server(tiny_checkpoint, tmp_path / "data", tmp_path / "fault.log", **env)
        cleanup.callback(lambda: fault.process.poll() is None and fault.kill())
        f = fault.session(KEYS["kill"])
        acked = {d["domain_id"]: d for d in (_create(f, name="acked-0"), _create(f, support("good", "bad"), "acked-1"))}
        expected = {domain_id: _scores(f, domain_id) for domain_id in acked}
        b = replicas[1].session(KEYS["kill"])
        traffic = _Traffic(replicas[1].session(KEYS["kill"]), next(iter(acked)))
        cleanup.callback(traffic.stop)
        killed = {"name": "killed-writing", "examples": support("yes", "no")}
        key = {"Idempotency-Key": str(uuid.uuid4())}
        writer = fault.session(KEYS["kill"])
        writer.headers.update(key)
        fault.in_background("POST", "/v1/domains", killed, client=writer)
        fault.wait_for_log("test write delay")

        # F holds an open write transaction (and the tenant's lock): B reads and writes elsewhere
        assert _listed(b) == acked  # the uncommitted row is invisible
        # 200 (the scores are compared below: batched with the traffic's requests, the 6th decimal can differ)
        assert len(_scores(b, next(iter(acked)))) == len(TEXTS)
        _create(replicas[1].session(KEYS["other"]), name="during-the-kill")
        assert httpx.get(f"{replicas[1].url}/readyz", timeout=10).status_code == 200
        fault.kill()
        killed_at = time.monotonic()
        traffic.answered_after(killed_at, 3)
    statuses = traffic.stop()
    assert statuses and set(statuses) == {200}, (statuses, traffic.error)

    assert _listed(b) == acked  # every acknowledged domain, unchanged; the killed write absent
    for domain_id, scores in expected.items():
        assert_same_scores(_scores(b, domain_id), scores)
        assert b.get(f"/v1/domains/{domain_id}/examples").json()["version"] == 1
    retried = b.post("/v1/domains", json=killed, headers=key)  # the client's retry, on the survivor
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers, retried.text
    again = b.post("/v1/domains", json=killed, headers=key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["domain_id"] == retried.json()["domain_id"]
    assert set(_listed(b)) == {*acked, retried.json()["domain_id"]}
