"""Micro-batching of concurrent classify requests.

Requests with the same key that arrive within ``window_seconds`` of each other, or while the
model is busy with an earlier batch, are handed to the classifier together
(:meth:`app.service.ModelService.classify_many`: one length-sorted encoder pass per group) and
their results returned to each request in order. The key comes from
:meth:`app.service.ModelService.batch_key`: the domain id, or one shared key for every domain that
adapted only the head, whose requests share the base encoder's pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from torch import Tensor

ClassifyMany = Callable[[list[tuple[Any, list[str]]]], list[Tensor]]


@dataclass
class _Batch:
    requests: list[tuple[Any, list[str], asyncio.Future[Tensor]]] = field(default_factory=list)

    @property
    def texts(self) -> int:
        return sum(len(texts) for _, texts, _ in self.requests)


class MicroBatcher:
    """Merge concurrent ``classify(key, state, texts)`` calls with the same ``key``.

    Args:
        classify_many (`Callable[[list[(state, texts)]], list[Tensor]]`): the blocking
            classifier, run in a worker thread; returns (texts, classes) per request.
        window_seconds (`float`, defaults to 0.005): how long the first request of a batch
            waits for others.
        max_texts (`int`, defaults to 512): texts per merged call; later requests start a new
            batch.
    """

    def __init__(self, classify_many: ClassifyMany, window_seconds: float = 0.005, max_texts: int = 512) -> None:
        self._classify_many = classify_many
        self.window_seconds = window_seconds
        self.max_texts = max_texts
        self._pending: dict[str, _Batch] = {}
        self._model_lock = asyncio.Lock()
        self.calls = 0  # merged classifier calls made (for tests and metrics)

    async def classify(self, key: str, state: Any, texts: Sequence[str]) -> Tensor:
        """Probabilities (texts, classes) of ``texts`` under an adapted ``state``, in input order.

        Raises:
            Whatever the classifier raises, to every request of the batch.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Tensor] = loop.create_future()
        batch = self._pending.get(key)
        if batch is None or batch.texts + len(texts) > self.max_texts:
            batch = _Batch()
            self._pending[key] = batch
            loop.create_task(self._run(key, batch))
        batch.requests.append((state, list(texts), future))
        return await future

    async def _run(self, key: str, batch: _Batch) -> None:
        await asyncio.sleep(self.window_seconds)
        async with self._model_lock:  # requests keep joining while an earlier batch runs
            if self._pending.get(key) is batch:
                del self._pending[key]
            try:
                self.calls += 1
                results = await run_in_threadpool(self._classify_many, [(p, t) for p, t, _ in batch.requests])
            except Exception as error:  # delivered to every waiting request
                for _, _, future in batch.requests:
                    if not future.done():
                        future.set_exception(error)
                return
        for (_, _, future), result in zip(batch.requests, results, strict=True):
            if not future.done():
                future.set_result(result)
