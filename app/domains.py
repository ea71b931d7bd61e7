"""Writing domains: create one, or update its support set, as one sequence each. An earlier answer
of the same ``Idempotency-Key`` is replayed; otherwise the support set is adapted through the
adaptation queue and written to the store in one transaction (with the key's answer).

The handlers in :mod:`app.routers.domains` parse the request and map what these functions raise
(the store's exceptions, :class:`AnsweredDomainDeletedError`) to HTTP answers; nothing here knows
HTTP beyond the status an idempotent answer is stored with. The request's own checks run where
they ran before: inside the sequence, through the ``support_set`` callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from .adaptation import adapt_queued
from .queue import AdaptationQueue
from .service import AdaptedState, ModelService
from .storage import (
    DomainLimitError,
    DomainNotFoundError,
    DomainStore,
    DomainWrite,
    Examples,
    IdempotencyKey,
    IdempotentReplayError,
    StoredDomain,
    VersionConflictError,
)

DOMAIN_ID = re.compile(r"[0-9a-f]{32}")  # every id is uuid4().hex: other ids are never sent to the store


@dataclass(frozen=True)
class Replay:
    """The stored answer of an idempotent write, to send again."""

    status: int
    body: dict[str, Any]


class AnsweredDomainDeletedError(Exception):
    """The key's earlier write made or changed ``domain_id``, which was deleted since: a replay
    never hands out a deleted domain's id."""

    def __init__(self, domain_id: str) -> None:
        super().__init__(domain_id)
        self.domain_id = domain_id


async def stored_answer(store: DomainStore, tenant: str, key: IdempotencyKey | None) -> Replay | None:
    """The stored answer of ``key``'s earlier write, or ``None`` (no key, or not used yet).

    Raises:
        IdempotencyMismatchError: when the key was used with another request.
        AnsweredDomainDeletedError: when the domain the answer names was deleted since.
    """
    if key is None:
        return None
    answer = await run_in_threadpool(store.answer, tenant, key)
    if answer is None:
        return None
    domain_id = answer[1].get("domain_id")
    if isinstance(domain_id, str) and await run_in_threadpool(store.get, tenant, domain_id) is None:
        raise AnsweredDomainDeletedError(domain_id)
    return Replay(*answer)


async def require(store: DomainStore, tenant: str, domain_id: str, with_examples: bool = False) -> StoredDomain:
    """``tenant``'s domain ``domain_id`` (with its support set if ``with_examples``).

    Raises:
        DomainNotFoundError: when there is none (an id that is not a domain id is never looked up).
    """
    if not DOMAIN_ID.fullmatch(domain_id):
        raise DomainNotFoundError(domain_id)
    domain = await run_in_threadpool(store.get, tenant, domain_id, with_examples)
    if domain is None:
        raise DomainNotFoundError(domain_id)
    return domain


def adaptation(service: ModelService, state: AdaptedState, examples: Examples) -> DomainWrite:
    """What the store writes for ``state``, adapted by ``service`` on ``examples``."""
    info = service.info(state, [label for _, label in examples])
    return DomainWrite(state.labels, state.to_tensors(), info, examples, service.checkpoint_hash)


async def create(
    service: ModelService,
    store: DomainStore,
    queue: AdaptationQueue,
    tenant: str,
    name: str,
    support_set: Callable[[], Examples],
    *,
    limit: int,
    key: IdempotencyKey | None,
) -> StoredDomain | Replay:
    """Create a domain: replay ``key``'s answer, or check the request (``support_set()``, which
    raises what the request gets wrong), refuse a tenant at ``limit`` domains, adapt through the
    queue and store the domain (version 1) with the key's answer.

    Raises:
        DomainLimitError: when ``tenant`` keeps ``limit`` domains (before and at the write).
        IdempotencyMismatchError: when the key was used with another request.
        AnsweredDomainDeletedError: when the key's domain was deleted since.
        ApiError: 429 when the adaptation queue is full; whatever ``support_set`` raises.
    """
    if (replay := await stored_answer(store, tenant, key)) is not None:
        return replay
    examples = support_set()
    if await run_in_threadpool(store.count, tenant) >= limit:
        raise DomainLimitError(f"{tenant} keeps {limit} domains")
    state = await adapt_queued(queue, service, examples)
    write = adaptation(service, state, examples)
    try:
        return await run_in_threadpool(store.add, tenant, name, write, limit=limit, idempotency=key)
    except IdempotentReplayError as stored:  # a concurrent request with the same key won
        return Replay(stored.status, stored.body)


async def update(
    service: ModelService,
    store: DomainStore,
    queue: AdaptationQueue,
    tenant: str,
    domain_id: str,
    support_set: Callable[[StoredDomain], Examples],
    *,
    expected_version: int | None,
    key: IdempotencyKey | None,
) -> StoredDomain | Replay:
    """Update a domain's support set: replay ``key``'s answer, or read the domain, check
    ``expected_version``, build the new support set from the stored one (``support_set(domain)``,
    which raises what the request gets wrong), adapt through the queue and store it as the next
    version, if no other write came first.

    Raises:
        DomainNotFoundError: when there is no such domain (or it was deleted meanwhile).
        VersionConflictError: when the domain is not at ``expected_version``, or another write
            changed it meanwhile.
        IdempotencyMismatchError: when the key was used with another request.
        AnsweredDomainDeletedError: when the key's domain was deleted since.
        ApiError: 429 when the adaptation queue is full; whatever ``support_set`` raises.
    """
    if (replay := await stored_answer(store, tenant, key)) is not None:
        return replay
    domain = await require(store, tenant, domain_id, with_examples=True)
    if expected_version is not None and expected_version != domain.version:
        raise VersionConflictError(domain.version)
    examples = support_set(domain)
    state = await adapt_queued(queue, service, examples)
    write = adaptation(service, state, examples)
    try:
        return await run_in_threadpool(store.replace, domain, write, idempotency=key)
    except IdempotentReplayError as stored:  # a concurrent request with the same key won
        return Replay(stored.status, stored.body)


__all__ = [
    "DOMAIN_ID",
    "AnsweredDomainDeletedError",
    "Replay",
    "adaptation",
    "create",
    "require",
    "stored_answer",
    "update",
]
