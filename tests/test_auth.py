"""API keys and tenants: 401 without a valid bearer key, each tenant sees only its own domains
(another tenant's answers 404 like an unknown one), per-tenant limits, open mode."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metasent.app.auth import KeyRing
from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import assert_error, support

KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
CLASSIFY = {"texts": ["great tasty coffee"]}
PUT_BODY = {"examples": [{"text": "okay fine", "label": "meh"}]}


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        checkpoint=tiny_checkpoint,
        device="cpu",
        data_dir=tmp_path_factory.mktemp("auth-data"),
        api_keys=f" {KEY_A}, ,{KEY_B} ",
        max_domains_per_tenant=2,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def empty_store(client: TestClient) -> Iterator[None]:
    yield
    for headers in (A, B):
        for domain in client.get("/v1/domains", headers=headers).json()["domains"]:
            assert client.delete(f"/v1/domains/{domain['domain_id']}", headers=headers).status_code == 204


def create(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.post("/v1/domains", json={"name": "food", "examples": support()}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


ROUTES = [
    ("GET", "/v1/domains", None),
    ("POST", "/v1/domains", {"name": "food", "examples": support()}),
    ("GET", "/v1/domains/{id}", None),
    ("GET", "/v1/domains/{id}/examples", None),
    ("PUT", "/v1/domains/{id}/examples", PUT_BODY),
    ("DELETE", "/v1/domains/{id}", None),
    ("POST", "/v1/domains/{id}/classify", CLASSIFY),
    ("POST", "/v1/classify", {"examples": support(), "texts": ["great"]}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY_A}x"}, "invalid_api_key"),
        ({"Authorization": f"Basic {KEY_A}"}, "missing_api_key"),
        ({"Authorization": KEY_A}, "missing_api_key"),
    ],
)
def test_every_v1_route_needs_a_valid_key(
    client: TestClient, method: str, path: str, body: Any, headers: dict[str, str], code: str
) -> None:
    domain = create(client, A)
    response = client.request(method, path.format(id=domain["domain_id"]), json=body, headers=headers)
    error = assert_error(response, 401, "Authorization", code)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Bearer" in error["details"][0]["fix"]
    assert client.get(f"/v1/domains/{domain['domain_id']}", headers=A).json() == domain  # nothing changed
    assert len(client.get("/v1/domains", headers=A).json()["domains"]) == 1


@pytest.mark.parametrize(("method", "path", "body"), [r for r in ROUTES if "{id}" in r[1]])
def test_another_tenants_domain_is_not_found(client: TestClient, method: str, path: str, body: Any) -> None:
    domain = create(client, A)
    unknown_id = "0" * 32
    theirs = client.request(method, path.format(id=domain["domain_id"]), json=body, headers=B)
    unknown = client.request(method, path.format(id=unknown_id), json=body, headers=B)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.text.replace(domain["domain_id"], unknown_id) == unknown.text
    assert_error(theirs, 404, "domain_id", "domain_not_found")
    assert client.get(f"/v1/domains/{domain['domain_id']}", headers=A).json() == domain
    assert client.get("/v1/domains", headers=B).json()["domains"] == []


def test_tenants_are_separate(client: TestClient) -> None:
    a, b = create(client, A), create(client, B)
    assert [d["domain_id"] for d in client.get("/v1/domains", headers=A).json()["domains"]] == [a["domain_id"]]
    assert [d["domain_id"] for d in client.get("/v1/domains", headers=B).json()["domains"]] == [b["domain_id"]]
    assert client.post(f"/v1/domains/{b['domain_id']}/classify", json=CLASSIFY, headers=B).status_code == 200
    assert client.post("/v1/classify", json={"examples": support(), "texts": ["great"]}, headers=B).status_code == 200
    store = client.app.state.store  # type: ignore[attr-defined]
    tenant_a = f"t-{hashlib.sha256(KEY_A.encode()).hexdigest()[:16]}"  # derived from the key's hash
    assert store.get(tenant_a, a["domain_id"]) is not None
    assert store.get(tenant_a, b["domain_id"]) is None and store.get("default", a["domain_id"]) is None


def test_domains_per_tenant_limit(client: TestClient) -> None:
    create(client, A), create(client, A)
    response = client.post("/v1/domains", json={"name": "food", "examples": support()}, headers=A)
    error = assert_error(response, 422, "domains", "too_many_domains")
    assert "METASENT_MAX_DOMAINS_PER_TENANT" in error["details"][0]["fix"]
    create(client, B)  # another tenant has its own quota


def test_health_routes_need_no_key_ops_routes_do(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok" and client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 401 and client.get("/docs", headers=A).status_code == 200
    assert client.get("/openapi.json").status_code == 401  # METASENT_OPS_ACCESS=key, the default
    spec = client.get("/openapi.json", headers=A).json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            secured = path.startswith("/v1") or path == "/metrics"
            assert (operation.get("security") == [{"ApiKey": []}]) == secured, path
            if path.startswith("/v1"):
                assert "401" in operation["responses"]


def test_keyring_hashes_keys() -> None:
    ring = KeyRing(["k1", "k2", "k1"])
    assert not ring.open and KeyRing([]).open
    assert ring.tenant("k1") == f"t-{hashlib.sha256(b'k1').hexdigest()[:16]}" != ring.tenant("k2")
    assert ring.tenant("k3") is None and ring.tenant("") is None
    assert "k1" not in repr(vars(ring))


def test_open_mode_warns_and_needs_no_key(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="metasent.app.main"), TestClient(create_app(settings)) as client:
        domain = create(client, {})
        assert create(client, {"Authorization": "Bearer anything"})["domain_id"] != domain["domain_id"]
        assert len(client.get("/v1/domains").json()["domains"]) == 2
    assert any("no METASENT_API_KEYS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
