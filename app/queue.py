"""Back-pressure for adaptations: a bounded queue that runs one adaptation at a time.

An adaptation holds the model for seconds, so concurrent ``POST /v1/domains`` requests wait
their turn here instead of piling up threads. At most ``capacity`` adaptations wait or run at
once; the next one is refused with 429 and a ``Retry-After`` estimated from recent adaptation
times. A request that gives up (its timeout, or the client went away) leaves the queue at once
when it was still waiting; one already running finishes in its worker thread and its result is
dropped, so nothing half-done is ever stored.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from .errors import ApiError

T = TypeVar("T")


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    abandoned: bool = False
    started: bool = False
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdaptationQueue:
    """Run blocking adaptation calls one at a time, at most ``capacity`` waiting or running.

    Args:
        capacity (`int`): adaptations waiting or running at once (``METASENT_ADAPT_QUEUE_SIZE``).
        observe (`Callable[[float], None]`, *optional*): called with the seconds of each finished
            adaptation (the metrics histogram).
        history (`int`, defaults to 20): recent adaptations averaged for ``Retry-After``.
        default_seconds (`float`, defaults to 1.0): the estimate before any adaptation finished.
    """

    def __init__(
        self,
        capacity: int,
        observe: Callable[[float], None] | None = None,
        history: int = 20,
        default_seconds: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.depth = 0  # waiting + running
        self._observe = observe
        self._recent: deque[float] = deque(maxlen=history)
        self._default_seconds = default_seconds
        self._lock: asyncio.Lock | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: mean recent adaptation time x depth, at least 1."""
        mean = sum(self._recent) / len(self._recent) if self._recent else self._default_seconds
        return max(1, math.ceil(mean * max(self.depth, 1)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Queue ``fn(*args)``, run it in a worker thread when its turn comes, return its result.

        Raises:
            ApiError: 429 ``adaptation_queue_full`` (with ``Retry-After``) when ``capacity``
                adaptations are already waiting or running.
            Whatever ``fn`` raises.
        """
        if self.depth >= self.capacity:
            seconds = self.retry_after()
            raise ApiError(
                429,
                "adaptation_queue_full",
                f"{self.depth} adaptations are waiting or running; this server queues at most {self.capacity}",
                "server",
                f"retry in {seconds} s (Retry-After header); server setting METASENT_ADAPT_QUEUE_SIZE",
                headers={"Retry-After": str(seconds)},
            )
        job = _Job(fn, args)
        self.depth += 1
        task = asyncio.create_task(self._execute(job))
        self._jobs.add(task)  # keep a reference: the job outlives a request that gives up
        task.add_done_callback(self._jobs.discard)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.abandoned = True
            if not job.started:  # still waiting: leave the queue now
                self.depth -= 1
            raise

    async def _execute(self, job: _Job) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if job.abandoned:
                return
            job.started = True
            start = time.perf_counter()
            try:
                result = await run_in_threadpool(job.fn, *job.args)
            except Exception as error:  # delivered to the waiting request
                if not job.future.done():
                    job.future.set_exception(error)
                    if job.abandoned:
                        job.future.exception()  # retrieved: no "never retrieved" warning
                return
            finally:
                self.depth -= 1
                seconds = time.perf_counter() - start
                self._recent.append(seconds)
                if self._observe is not None:
                    self._observe(seconds)
            if not job.future.done():
                job.future.set_result(result)
