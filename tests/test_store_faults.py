"""Store faults an operator hits: a database made read-only during writes, then repaired, is
written again without a restart, and ``/readyz`` says not ready while writes cannot succeed; a
failing write logs no user text (SQL parameters hidden), at any level."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import NEGATIVE, POSITIVE, assert_error, support


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` and its files read-only, as an operator's mistake would make them: ``chmod``
    for a normal user; as root (which file modes do not stop) the immutable attribute
    (``chattr +i``), which stops root too."""
    paths = [*directory.iterdir(), directory]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
        return
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        path.chmod(modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path in reversed(paths):
            path.chmod(modes[path])


def _create(client: TestClient, name: str = "food"):
    return client.post("/v1/domains", json={"name": name, "examples": support()})


def test_writes_recover_after_a_read_only_fault(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", data_dir=data))
    with TestClient(app) as client:
        assert _create(client).status_code == 201
        assert client.get("/readyz").status_code == 200
        # the pool's connections closed (the last one checkpoints and removes the -wal and -shm files):
        # those opened from here on see a read-only database
        app.state.store.engine.dispose()
        with read_only(data):
            assert_error(_create(client, "during"), 503, "server", "store_unavailable")
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["store_reachable"] is False
        # repaired: no restart, writes succeed by themselves and /readyz follows
        created = _create(client, "after")
        assert created.status_code == 201, created.text
        assert client.get("/readyz").status_code == 200
        names = sorted(d["name"] for d in client.get("/v1/domains").json()["domains"])
        assert names == ["after", "food"]


def test_a_failing_write_logs_no_user_text(
    tiny_checkpoint: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The INSERT that carries the support texts fails: on PostgreSQL a read-only database (as a
    standby is; 503), on SQLite a trigger that aborts it (500); neither logs a text."""
    app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", database_url=database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        engine = app.state.store.engine
        sqlite = engine.dialect.name == "sqlite"

        def failing_insert(dbapi_connection, _) -> None:  # reads work; the INSERT with the texts fails
            cursor = dbapi_connection.cursor()
            if sqlite:
                cursor.execute(
                    "CREATE TEMP TRIGGER no_insert BEFORE INSERT ON domains BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            else:
                cursor.execute("SET default_transaction_read_only = on")
            cursor.close()
            if not sqlite:
                dbapi_connection.commit()

        event.listen(engine, "connect", failing_insert)
        engine.dispose()
        caplog.set_level(logging.DEBUG)
        if sqlite:
            assert_error(_create(client), 500, "server", "internal_error")
        else:
            assert_error(_create(client), 503, "server", "store_unavailable")
            assert client.get("/readyz").status_code == 503  # the write probe fails too
        event.remove(engine, "connect", failing_insert)
        engine.dispose()
        assert _create(client).status_code == 201
    logged = "\n".join(logging.Formatter().format(record) for record in caplog.records)
    assert "INSERT INTO domains" in logged  # the failure itself is logged, without its parameters
    for text in POSITIVE[:5] + NEGATIVE[:5]:
        assert text not in logged


SHM_FAULT = """
import json, os, subprocess, sys
from pathlib import Path
from fastapi.testclient import TestClient
from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import support

data = Path(sys.argv[2])
app = create_app(Settings(checkpoint=sys.argv[1], device="cpu", data_dir=data))
body = {"name": "food", "examples": support()}
answers = {}
with TestClient(app) as client:
    answers["before"] = client.post("/v1/domains", json=body).status_code
    shm = data / "metasent.db-shm"  # mapped by the pool's open connections
    assert shm.exists(), sorted(os.listdir(data))
    root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(shm)], check=True) if root else shm.chmod(0o444)
    try:
        for name, method, path in [("create", "POST", "/v1/domains"), ("list", "GET", "/v1/domains"),
                                   ("readyz", "GET", "/readyz"), ("healthz", "GET", "/healthz")]:
            response = client.request(method, path, json=body if method == "POST" else None)
            answers[name] = [response.status_code, response.json().get("error", {}).get("code")]
    finally:
        subprocess.run(["chattr", "-i", str(shm)], check=True) if root else shm.chmod(0o644)
    answers["after"] = client.post("/v1/domains", json=body).status_code
    answers["domains"] = len(client.get("/v1/domains").json()["domains"])
print(json.dumps(answers))
"""


def test_an_unwritable_shm_file_answers_503_instead_of_sigbus(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """SQLite memory-maps ``metasent.db-shm``; made unwritable (``chattr +i`` as root), the next
    transaction's write to the mapping killed the process with SIGBUS. The store checks the file
    first: 503 store_unavailable and /readyz not ready, /healthz alive, writes again once repaired.
    In a child process, so a SIGBUS fails this test instead of ending the test run."""
    result = subprocess.run(
        [sys.executable, "-c", SHM_FAULT, str(tiny_checkpoint), str(tmp_path / "data")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["before"] == answers["after"] == 201
    for name in ("create", "list"):
        assert answers[name] == [503, "store_unavailable"], answers
    assert answers["readyz"][0] == 503 and answers["healthz"][0] == 200
    assert answers["domains"] == 2  # the refused create wrote nothing; nothing was lost
