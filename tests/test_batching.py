"""Micro-batching of concurrent classify requests."""

from __future__ import annotations

import asyncio

import torch

from app.batching import MicroBatcher
from meta.config import InnerLoopConfig
from meta.inner_loop import inner_loop, predict_proba
from meta.model import MetaLearner
from tests.conftest import NEGATIVE, POSITIVE


def test_concurrent_requests_share_one_call_and_equal_one_by_one(tiny_model: MetaLearner) -> None:
    adaptation = inner_loop(
        tiny_model, POSITIVE[:3] + NEGATIVE[:3], ["positive"] * 3 + ["negative"] * 3, InnerLoopConfig(adapted_layers=1)
    )
    seen: list[int] = []

    def classify(params, texts):
        seen.append(len(texts))
        return predict_proba(tiny_model, params, texts, batch_size=4)

    requests = [POSITIVE[3:6], NEGATIVE[3:5], ["great coffee"], NEGATIVE[5:9] + POSITIVE[6:8]]

    async def run() -> list[torch.Tensor]:
        batcher = MicroBatcher(classify, window_seconds=0.05)
        results = await asyncio.gather(*(batcher.classify("d", adaptation.params, r) for r in requests))
        assert batcher.calls == 1
        return results

    results = asyncio.run(run())
    assert seen == [sum(len(r) for r in requests)]
    for texts, probs in zip(requests, results, strict=True):
        one_by_one = torch.cat([predict_proba(tiny_model, adaptation.params, [t]) for t in texts])
        torch.testing.assert_close(probs, one_by_one, atol=1e-5, rtol=1e-5)


def test_domains_are_not_mixed_and_limits_split_batches() -> None:
    calls: list[tuple[str, int]] = []

    def classify(params, texts):
        calls.append((params, len(texts)))
        return torch.full((len(texts), 2), float(params == "b"))

    async def run() -> list[torch.Tensor]:
        batcher = MicroBatcher(classify, window_seconds=0.02, max_texts=3)
        return await asyncio.gather(
            batcher.classify("a", "a", ["x", "y"]),
            batcher.classify("b", "b", ["z"]),
            batcher.classify("a", "a", ["w", "v"]),  # would exceed max_texts=3: a new batch
        )

    a1, b, a2 = asyncio.run(run())
    assert sorted(calls) == [("a", 2), ("a", 2), ("b", 1)]
    assert a1.sum() == 0 and a2.sum() == 0 and b.sum() == 2


def test_errors_reach_every_request() -> None:
    def classify(params, texts):
        raise RuntimeError("boom")

    async def run() -> list:
        batcher = MicroBatcher(classify, window_seconds=0.01)
        return await asyncio.gather(
            batcher.classify("a", None, ["x"]), batcher.classify("a", None, ["y"]), return_exceptions=True
        )

    results = asyncio.run(run())
    assert len(results) == 2 and all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
