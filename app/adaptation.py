"""Adapting domains on the service and keeping them fresh in the store.

The plain functions are blocking (torch work and database I/O). Request handlers call their
queued forms, :func:`adapt_queued` and :func:`refresh_queued`, which run them through the bounded
:class:`app.queue.AdaptationQueue` (one adaptation at a time, 429 with ``Retry-After`` when
full), so every adaptation a request can trigger is back-pressured the same way. Only the
start-up re-adaptation (:func:`readapt_all`) calls them directly, before traffic is served.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from torch import Tensor

from metasent.meta.adaptation import AdaptedState

from .queue import AdaptationQueue
from .service import ModelService
from .storage import DomainNotFoundError, DomainStore, DomainWrite, Examples, StoredDomain, VersionConflictError

logger = logging.getLogger(__name__)


_locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


def _domain_lock(domain_id: str) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(domain_id)
        if lock is None:
            lock = threading.Lock()
            _locks[domain_id] = lock
        return lock


def adapt(service: ModelService, examples: Examples) -> AdaptedState:
    """Run the checkpoint's inner loop on ``examples`` (``(text, label)`` pairs).

    Args:
        service (`ModelService`): the model.
        examples (`list[tuple[str, str]]`): the support set.

    Returns:
        `AdaptedState`: the adapted head and tensors, and the run's figures.
    """
    return service.adapt([text for text, _ in examples], [label for _, label in examples])


def refresh(service: ModelService, store: DomainStore, domain: StoredDomain, attempts: int = 3) -> StoredDomain:
    """``domain``, re-adapted from its stored support set first if another checkpoint adapted it.

    One re-adaptation per domain runs at a time in this process; requests that waited for it get
    its result. The version is kept (the support set did not change); the new checkpoint hash is
    recorded. When another write lands first (a ``PUT .../examples`` or another replica's
    re-adaptation, possibly on another checkpoint), the domain is read again and re-adapted from
    what is stored now: the result is always adapted with ``service``'s checkpoint, never the
    tensors another checkpoint adapted.

    Args:
        service (`ModelService`): the loaded model and its ``checkpoint_hash``.
        store (`DomainStore`): where the domain lives.
        domain (`StoredDomain`): the domain as read.
        attempts (`int`, defaults to 3): re-adaptations tried before giving up.

    Returns:
        `StoredDomain`: the domain adapted with the loaded checkpoint.

    Raises:
        DomainNotFoundError: when the domain was deleted in the meantime.
        VersionConflictError: when other writes won ``attempts`` times in a row.
    """
    if domain.checkpoint_hash == service.checkpoint_hash:
        return domain
    latest = domain.version
    with _domain_lock(domain.domain_id):
        for _ in range(attempts):
            current = store.get(domain.tenant, domain.domain_id, with_examples=True)
            if current is None:
                raise DomainNotFoundError(domain.domain_id)
            if current.checkpoint_hash == service.checkpoint_hash:
                return current
            examples = current.examples or []
            state = adapt(service, examples)
            info = service.info(state, [label for _, label in examples])
            write = DomainWrite(state.labels, state.to_tensors(), info, examples, service.checkpoint_hash)
            try:
                stored = store.replace(current, write, bump_version=False)
            except VersionConflictError as error:  # another write won: adapt what is stored now
                latest = error.current
                continue
            logger.info(
                "re-adapted stale domain %s (checkpoint %s -> %s)",
                domain.domain_id, current.checkpoint_hash[:12], service.checkpoint_hash[:12],
            )  # fmt: skip
            return stored
    raise VersionConflictError(latest)


async def adapt_queued(queue: AdaptationQueue, service: ModelService, examples: Examples) -> AdaptedState:
    """:func:`adapt` through the adaptation queue; nothing is stored here.

    A request that gives up (timeout, client gone) while its adaptation still waits leaves the
    queue; one already running finishes and its result is dropped.

    Raises:
        ApiError: 429 ``adaptation_queue_full`` (with ``Retry-After``) when the queue is full.
    """
    return await queue.run(adapt, service, examples)


async def refresh_queued(
    queue: AdaptationQueue, service: ModelService, store: DomainStore, domain: StoredDomain
) -> StoredDomain:
    """:func:`refresh` through the adaptation queue when ``domain`` is stale; a fresh domain
    returns at once without taking a queue slot.

    A stale domain's re-adaptation keeps its version and support set, so one that finishes after
    its request gave up is still stored: the next request finds the domain fresh.

    Raises:
        ApiError: 429 ``adaptation_queue_full`` (with ``Retry-After``) when the queue is full.
        DomainNotFoundError: when the domain was deleted in the meantime.
        VersionConflictError: when other writes kept winning (see :func:`refresh`).
    """
    if domain.checkpoint_hash == service.checkpoint_hash:
        return domain
    return await queue.run(refresh, service, store, domain)


def readapt_all(service: ModelService, store: DomainStore) -> int:
    """Re-adapt every domain adapted with another checkpoint (``METASENT_READAPT_ON_LOAD``).

    Returns:
        `int`: how many domains were re-adapted.
    """
    stale = store.stale(service.checkpoint_hash)
    logger.info("re-adapting %d stale domains at start-up", len(stale))
    done = 0
    for tenant, domain_id in stale:
        domain = store.get(tenant, domain_id)
        if domain is not None:
            try:
                refresh(service, store, domain)
                done += 1
            except DomainNotFoundError:  # deleted meanwhile
                continue
    return done


def predictions(labels: tuple[str, ...] | list[str], probs: Tensor, truncated: list[bool]) -> list[dict[str, Any]]:
    """Per row of ``probs`` (texts, classes): the best label, every label's score and whether the
    text was cut before the encoder saw all of it (``truncated``, one flag per text, from
    :meth:`app.service.ModelService.truncated`)."""
    return [
        {
            "label": labels[int(row.argmax())],
            "scores": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
            "truncated": cut,
        }
        for row, cut in zip(probs, truncated, strict=True)
    ]


__all__ = ["adapt", "adapt_queued", "predictions", "readapt_all", "refresh", "refresh_queued"]
