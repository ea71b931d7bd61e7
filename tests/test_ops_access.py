"""Operator endpoints under hostile clients and offline operators: /docs and /redoc load their
assets from this server only (the installed fastapi-offline package) under a CSP; who may read
/metrics, /docs, /redoc and /openapi.json is METASENT_OPS_ACCESS (a key by default when API keys
are on), or /metrics moves to METASENT_METRICS_PORT; /healthz stays open and shows no tenant
figures or file paths."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import assert_error, metric, support

KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPS_PATHS = ("/metrics", "/docs", "/redoc", "/openapi.json")


def _settings(checkpoint: Path, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(checkpoint=checkpoint, device="cpu", data_dir=data_dir, **overrides)


def _urls(html: str) -> list[str]:
    """Every URL an HTML page names: src/href attributes and quoted strings with a scheme or ``//``."""
    attributes = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']*)["']""", html)
    quoted = re.findall(r"""["']((?:[a-z][a-z0-9+.-]*:)?//[^"']*)["']""", html, flags=re.IGNORECASE)
    return attributes + quoted


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_name_no_other_host_and_carry_a_csp(tiny_checkpoint: Path, tmp_path: Path, page: str) -> None:
    with TestClient(create_app(_settings(tiny_checkpoint, tmp_path))) as client:
        response = client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        urls = _urls(response.text)
        assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
        assert "http://" not in response.text and "https://" not in response.text
        for url in urls:  # every asset the page names is served here
            assert client.get(url).status_code == 200, url
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp.split(";")[1]
        for script in re.findall(r"<script>(.*?)</script>", response.text, flags=re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp  # the page's own inline script is allowed, no other


def test_swagger_assets_come_from_the_installed_package(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tiny_checkpoint, tmp_path))) as client:
        script = client.get("/docs-assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and "SwaggerUIBundle" in script.text
        assert client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_ops_routes_need_a_key_when_api_keys_are_on(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tiny_checkpoint, tmp_path, api_keys=KEY))) as client:
        for path in OPS_PATHS:
            assert_error(client.get(path), 401, "Authorization", "missing_api_key")
            assert_error(client.get(path, headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
            assert client.get(path, headers=AUTH).status_code == 200, path
        health = client.get("/healthz")  # orchestrators: no key, and nothing of any tenant or path
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert {"domains", "checkpoint"}.isdisjoint(health.json())
        assert str(tmp_path) not in health.text and str(tiny_checkpoint) not in health.text
        assert client.get("/readyz").status_code == 200


def test_ops_access_open_lets_anyone_read_them(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_checkpoint, tmp_path, api_keys=KEY, ops_access="open")
    with TestClient(create_app(settings)) as client:
        for path in OPS_PATHS:
            assert client.get(path).status_code == 200, path
        assert "security" not in client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert_error(client.get("/v1/domains"), 401, "Authorization")  # the API itself still needs a key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_on_their_own_port(tiny_checkpoint: Path, tmp_path: Path) -> None:
    port = _free_port()
    settings = _settings(tiny_checkpoint, tmp_path, api_keys=KEY, metrics_port=port)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/domains", json={"name": "food", "examples": support()}, headers=AUTH).status_code == 201
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics")  # no key on the metrics port
        assert scraped.status_code == 200 and metric(scraped.text, "metasent_domains") == 1
        assert_error(client.get("/metrics", headers=AUTH), 404, "path", "http_404")  # not on the API port
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics")
