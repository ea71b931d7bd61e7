"""The memory bound of classification (:class:`metasent.app.limits.CharBudget`): a request with more
characters of text than METASENT_MAX_REQUEST_CHARS answers 413, one that would take the characters
in flight past METASENT_MAX_INFLIGHT_CHARS answers 503 with Retry-After; admitted characters never
pass the budget, and are given back when requests end (also when they fail)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from metasent.app.limits import CharBudget
from metasent.app.main import create_app
from metasent.app.settings import Settings
from tests.conftest import assert_error, gated_adaptations, running, support, wait_until

PER_REQUEST, IN_FLIGHT = 1000, 1500


def _settings(checkpoint: Path, data_dir: Path) -> Settings:
    return Settings(
        checkpoint=checkpoint,
        device="cpu",
        data_dir=data_dir,
        max_request_chars=PER_REQUEST,
        max_inflight_chars=IN_FLIGHT,
        max_text_chars=PER_REQUEST,
    )


def _texts(chars: int) -> list[str]:
    """Texts of ``chars`` characters in all (10 of them)."""
    return ["good " * (chars // 50)] * 10


def _chars(examples: list[dict[str, str]]) -> int:
    return sum(len(example["text"]) for example in examples)


def test_a_request_past_the_per_request_limit_answers_413(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tiny_checkpoint, tmp_path))) as client:
        domain_id = client.post("/v1/domains", json={"name": "food", "examples": support()}).json()["domain_id"]
        for path, body in [
            (f"/v1/domains/{domain_id}/classify", {"texts": _texts(PER_REQUEST + 50)}),
            (f"/v1/domains/{domain_id}/suggest", {"texts": _texts(PER_REQUEST + 50)}),
            ("/v1/classify", {"examples": support(), "texts": _texts(PER_REQUEST - _chars(support()) + 50)}),
        ]:
            error = assert_error(client.post(path, json=body), 413, "texts", "too_many_characters")
            assert "METASENT_MAX_REQUEST_CHARS" in error["details"][0]["fix"] and str(PER_REQUEST) in error["message"]
        ok = client.post(f"/v1/domains/{domain_id}/classify", json={"texts": _texts(PER_REQUEST)})
        assert ok.status_code == 200, ok.text
        assert client.app.state.char_budget.admitted == 0  # type: ignore[attr-defined]


def test_requests_past_the_in_flight_budget_answer_503_until_it_frees(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """One request held in flight (its adaptation gated) holds its characters; a second that would
    pass the budget is refused at once; once the first ends, the second is served."""
    app = create_app(_settings(tiny_checkpoint, tmp_path))
    held_body = {"examples": support(), "texts": _texts(900 - _chars(support()))}
    held_chars = _chars(held_body["examples"]) + sum(map(len, held_body["texts"]))
    assert held_chars <= PER_REQUEST < IN_FLIGHT < 2 * held_chars  # one fits the budget, two do not

    async def scenario() -> None:
        async with running(app) as client:
            budget: CharBudget = app.state.char_budget
            created = await client.post("/v1/domains", json={"name": "food", "examples": support()})
            small_path = f"/v1/domains/{created.json()['domain_id']}/classify"  # no adaptation: not held
            with gated_adaptations(app) as gate:
                held = asyncio.ensure_future(client.post("/v1/classify", json=held_body))
                await wait_until(lambda: gate.entered == 1, "the first request to be adapting")
                assert budget.admitted == held_chars
                refused = await client.post("/v1/classify", json=held_body)
                error = assert_error(refused, 503, "server", "server_busy")
                assert (
                    "METASENT_MAX_INFLIGHT_CHARS" in error["details"][0]["fix"] and str(IN_FLIGHT) in error["message"]
                )
                assert refused.headers["Retry-After"] == "1"
                small = await client.post(small_path, json={"texts": ["fine"]})
                assert small.status_code == 200, small.text  # within what is left: admitted beside it
                gate.release()
                assert (await held).status_code == 200
            assert budget.admitted == 0
            assert (await client.post("/v1/classify", json=held_body)).status_code == 200
            assert budget.peak <= IN_FLIGHT

    asyncio.run(scenario())


def test_concurrent_requests_never_hold_more_than_the_budget(tiny_checkpoint: Path, tmp_path: Path) -> None:
    app = create_app(_settings(tiny_checkpoint, tmp_path))

    async def scenario() -> None:
        async with running(app) as client:
            created = await client.post("/v1/domains", json={"name": "food", "examples": support()})
            path = f"/v1/domains/{created.json()['domain_id']}/classify"
            answers = await asyncio.gather(*(client.post(path, json={"texts": _texts(600)}) for _ in range(8)))
            assert {answer.status_code for answer in answers} <= {200, 503}, [a.text for a in answers]
            assert any(answer.status_code == 200 for answer in answers)
            budget: CharBudget = app.state.char_budget
            assert 0 < budget.peak <= IN_FLIGHT and budget.admitted == 0

    asyncio.run(scenario())


def test_the_in_flight_budget_must_fit_one_request(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="METASENT_MAX_INFLIGHT_CHARS"):
        Settings(data_dir=tmp_path, max_request_chars=10_000, max_inflight_chars=5_000)
    defaults = Settings(data_dir=tmp_path)
    assert (defaults.max_request_chars, defaults.max_inflight_chars) == (2_000_000, 8_000_000)
