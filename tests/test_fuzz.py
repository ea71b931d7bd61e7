"""Schemathesis against the live OpenAPI schema of the app (tiny checkpoint, in process): every
operation, the durable-domain ones included (PUT/GET examples, stateless /v1/classify), fuzzed with
valid and invalid inputs, on a server with API keys and on an open one. No answer may be a 5xx,
and without a valid key no /v1 operation may succeed.

Path parameters are sometimes swapped for the id of a stored domain, so the handlers behind them
run too; those domains were adapted with another checkpoint, so their first use re-adapts them
(the stale path, through the adaptation queue)."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from metasent.app.main import create_app
from metasent.app.settings import Settings
from metasent.meta.checkpoint import save_checkpoint
from metasent.meta.config import CheckpointConfig, InnerLoopConfig
from tests.conftest import make_tiny_model, support

MAX_EXAMPLES = 30  # per operation and generation mode
KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_KEY: list[dict[str, str]] = [{}, {"Authorization": "Bearer not-a-key"}, {"Authorization": KEY}]  # none/wrong/bare
STORED_DOMAINS = 3


def _checkpoint(directory: Path, steps: int) -> Path:
    model = make_tiny_model(directory)
    config = CheckpointConfig(
        algorithm="none", encoder=model.encoder_config, inner_loop=InnerLoopConfig(steps=steps, lr=0.1)
    )
    return save_checkpoint(directory / f"checkpoint-{steps}", model, config)


def _app(api_keys: str | None) -> tuple[FastAPI, list[str]]:
    """The app on a tiny checkpoint (1 inner step) with a small body limit to reach it too, over a
    store that already holds domains adapted with another checkpoint (2 steps): stale ones."""
    directory = Path(tempfile.mkdtemp(prefix="metasent-fuzz-"))
    common: dict[str, Any] = {
        "device": "cpu",
        "data_dir": directory / "data",
        "api_keys": api_keys,
        "max_domains_per_tenant": 20,
        "max_body_bytes": 64 * 1024,
    }
    headers = AUTH if api_keys else {}
    with TestClient(create_app(Settings(checkpoint=_checkpoint(directory, 2), **common))) as seed:
        ids = []
        for _ in range(STORED_DOMAINS):
            created = seed.post("/v1/domains", json={"name": "seed", "examples": support()}, headers=headers)
            assert created.status_code == 201, created.text
            ids.append(created.json()["domain_id"])
    return create_app(Settings(checkpoint=_checkpoint(directory, 1), **common)), ids


def _schema(app: FastAPI, domain_ids: list[str]) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)  # a key: ops routes need one
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
    )

    @schema.hook
    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
        """Keep the generated domain_id, or use a stored domain's (never for DELETE, so the stored
        domains stay for the other operations)."""
        if not path_parameters or "domain_id" not in path_parameters or context.operation.method.upper() == "DELETE":
            return st.just(path_parameters)
        return st.sampled_from([path_parameters, *({**path_parameters, "domain_id": d} for d in domain_ids)])

    return schema


keyed_schema = _schema(*_app(KEY))
open_schema = _schema(*_app(None))
_unauthenticated = itertools.cycle(NO_KEY)


@keyed_schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_with_api_keys(case: schemathesis.Case) -> None:
    """With a valid key every handler runs; without one, /v1 answers 401 (never 2xx, never 5xx)."""
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
    response = case.call(headers=next(_unauthenticated))
    assert response.status_code < 500, response.text
    if case.path.startswith("/v1"):
        assert not 200 <= response.status_code < 300, f"{case.method} {case.path} answered without a valid key"


@open_schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_open(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
