"""Schemathesis against the live OpenAPI schema of the app (tiny checkpoint, in process): every
operation fuzzed with valid and invalid inputs; no answer may be a 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from app.main import create_app
from app.settings import Settings
from meta.checkpoint import save_checkpoint
from meta.config import CheckpointConfig, InnerLoopConfig
from tests.conftest import make_tiny_model

MAX_EXAMPLES = 30  # per operation and generation mode; the whole run takes ~10 s


def _app() -> FastAPI:
    """The app on a tiny checkpoint (1 inner step), with a small body limit to reach it too."""
    directory = Path(tempfile.mkdtemp(prefix="metasent-fuzz-"))
    model = make_tiny_model(directory)
    config = CheckpointConfig(algorithm="none", encoder=model.config, inner_loop=InnerLoopConfig(steps=1, lr=0.1))
    checkpoint = save_checkpoint(directory / "checkpoint", model, config)
    return create_app(Settings(checkpoint=checkpoint, device="cpu", max_domains=20, max_body_bytes=64 * 1024))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
