"""Micro-batching of concurrent classify requests, and the encoder pass shared by head-only
domains."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from metasent.app.batching import MicroBatcher
from metasent.app.service import ModelService
from metasent.meta.adaptation import AdaptedState, Predictor, inner_loop
from metasent.meta.config import CheckpointConfig, InnerLoopConfig
from metasent.meta.model import MetaLearner
from tests.conftest import NEGATIVE, POSITIVE


def adapt(model: MetaLearner, layers: int, shift: int = 0) -> AdaptedState:
    texts = POSITIVE[shift : shift + 3] + NEGATIVE[shift : shift + 3]
    return inner_loop(model, texts, ["positive"] * 3 + ["negative"] * 3, InnerLoopConfig(adapted_layers=layers))


def predict_proba(model: MetaLearner, state: AdaptedState, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    return Predictor(model, InnerLoopConfig(), batch_size).predict_proba(state, texts)


def test_concurrent_requests_share_one_call_and_equal_one_by_one(tiny_model: MetaLearner) -> None:
    params = adapt(tiny_model, layers=1)
    seen: list[int] = []

    def classify_many(requests):
        seen.append(len(requests))
        texts = [t for _, ts in requests for t in ts]
        probs = predict_proba(tiny_model, requests[0][0], texts, batch_size=4)
        sizes = [len(ts) for _, ts in requests]
        return list(torch.split(probs, sizes))

    requests = [POSITIVE[3:6], NEGATIVE[3:5], ["great coffee"], NEGATIVE[5:9] + POSITIVE[6:8]]

    async def run() -> list[torch.Tensor]:
        batcher = MicroBatcher(classify_many, window_seconds=0.05)
        results = await asyncio.gather(*(batcher.classify("d", params, r) for r in requests))
        assert batcher.calls == 1
        return results

    results = asyncio.run(run())
    assert seen == [len(requests)]
    for texts, probs in zip(requests, results, strict=True):
        one_by_one = torch.cat([predict_proba(tiny_model, params, [t]) for t in texts])
        torch.testing.assert_close(probs, one_by_one, atol=1e-5, rtol=1e-5)


def test_keys_are_not_mixed_and_limits_split_batches() -> None:
    calls: list[list[str]] = []

    def classify_many(requests):
        calls.append([p for p, _ in requests])
        return [torch.full((len(ts), 2), float(p == "b")) for p, ts in requests]

    async def run() -> list[torch.Tensor]:
        batcher = MicroBatcher(classify_many, window_seconds=0.02, max_texts=3)
        return await asyncio.gather(
            batcher.classify("a", "a", ["x", "y"]),
            batcher.classify("b", "b", ["z"]),
            batcher.classify("a", "a", ["w", "v"]),  # would exceed max_texts=3: a new batch
        )

    a1, b, a2 = asyncio.run(run())
    assert sorted(calls) == [["a"], ["a"], ["b"]]
    assert a1.sum() == 0 and a2.sum() == 0 and b.sum() == 2 and b.shape == (1, 2)


def test_errors_reach_every_request() -> None:
    def classify_many(requests):
        raise RuntimeError("boom")

    async def run() -> list:
        batcher = MicroBatcher(classify_many, window_seconds=0.01)
        return await asyncio.gather(
            batcher.classify("a", None, ["x"]), batcher.classify("a", None, ["y"]), return_exceptions=True
        )

    results = asyncio.run(run())
    assert len(results) == 2 and all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)


def test_head_only_domains_share_one_encoder_pass(tiny_model: MetaLearner, tmp_path: Path) -> None:
    service = ModelService(tiny_model, CheckpointConfig(), batch_size=4)
    food, drinks = adapt(tiny_model, 0), adapt(tiny_model, 0, shift=4)
    layered = adapt(tiny_model, 1)
    encoder_calls = 0

    def count(*_):
        nonlocal encoder_calls
        encoder_calls += 1

    handle = tiny_model.encoder.register_forward_hook(count)
    texts_a, texts_b = ["great coffee", "awful tea", "great coffee"], ["awful tea", "fresh bread"]
    results = service.classify_many([(food, texts_a), (drinks, texts_b), (layered, ["stale bread"])])
    handle.remove()
    # 3 distinct texts for the two head-only domains: one batch of 4; the layered domain: one more.
    assert encoder_calls == 2
    for params, texts, probs in [(food, texts_a, results[0]), (drinks, texts_b, results[1])]:
        torch.testing.assert_close(probs, predict_proba(tiny_model, params, texts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[2], predict_proba(tiny_model, layered, ["stale bread"]), atol=1e-5, rtol=1e-5)
