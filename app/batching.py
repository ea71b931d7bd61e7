"""Micro-batching of concurrent classify requests for the same domain.

Requests for one domain that arrive within ``window_seconds`` of each other, or while the model
is busy with an earlier batch, are merged into one call of the classifier (one length-sorted
encoder pass over all their texts) and their results split back in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from torch import Tensor

Classifier = Callable[[Any, list[str]], Tensor]


@dataclass
class _Pending:
    params: Any
    requests: list[tuple[Sequence[str], asyncio.Future[Tensor]]] = field(default_factory=list)


class MicroBatcher:
    """Merge concurrent ``classify(key, params, texts)`` calls with the same ``key``.

    Args:
        classify (`Callable[[params, list[str]], Tensor]`): the blocking classifier, run in a
            worker thread; returns (texts, classes).
        window_seconds (`float`, defaults to 0.005): how long the first request of a batch
            waits for others.
        max_texts (`int`, defaults to 512): texts per merged call; later requests start a new
            batch.
    """

    def __init__(self, classify: Classifier, window_seconds: float = 0.005, max_texts: int = 512) -> None:
        self._classify = classify
        self.window_seconds = window_seconds
        self.max_texts = max_texts
        self._pending: dict[str, _Pending] = {}
        self._model_lock = asyncio.Lock()
        self.calls = 0  # merged classifier calls made (for tests and metrics)

    async def classify(self, key: str, params: Any, texts: Sequence[str]) -> Tensor:
        """Probabilities (texts, classes) of ``texts`` under ``params``, in input order.

        Raises:
            Whatever the classifier raises, to every request of the batch.
        """
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        pending = self._pending.get(key)
        if pending is None or sum(len(t) for t, _ in pending.requests) + len(texts) > self.max_texts:
            pending = _Pending(params)
            self._pending[key] = pending
            asyncio.get_running_loop().create_task(self._run(key, pending))
        pending.requests.append((texts, future))
        return await future

    async def _run(self, key: str, pending: _Pending) -> None:
        await asyncio.sleep(self.window_seconds)
        async with self._model_lock:  # requests keep joining while an earlier batch runs
            if self._pending.get(key) is pending:
                del self._pending[key]
            texts = [text for request_texts, _ in pending.requests for text in request_texts]
            try:
                self.calls += 1
                probs = await run_in_threadpool(self._classify, pending.params, texts)
            except Exception as error:  # delivered to every waiting request
                for _, future in pending.requests:
                    if not future.done():
                        future.set_exception(error)
                return
        offset = 0
        for request_texts, future in pending.requests:
            if not future.done():
                future.set_result(probs[offset : offset + len(request_texts)])
            offset += len(request_texts)
