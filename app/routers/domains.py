"""``/v1/domains``: adapt a domain from a support set, list, show, update its examples, delete,
classify. Every route needs the caller's API key and sees only its tenant's domains."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .. import domains as domain_writes
from ..adaptation import Examples, predictions, refresh_queued
from ..auth import require_tenant
from ..dependencies import AdaptQueueDep, BatcherDep, CharBudgetDep, ServiceDep, SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..queue import AdaptationQueue
from ..schemas import (
    ClassifyRequest,
    ClassifyResponse,
    CreateDomain,
    Domain,
    DomainExamples,
    DomainList,
    ErrorResponse,
    LabelledText,
    SuggestedText,
    SuggestRequest,
    SuggestResponse,
    UpdateExamples,
)
from ..service import AdaptedState, ModelService
from ..settings import Settings
from ..storage import (
    DomainLimitError,
    DomainNotFoundError,
    DomainStore,
    IdempotencyKey,
    IdempotencyMismatchError,
    StoredDomain,
    VersionConflictError,
)
from .common import QUEUE_FULL, REQUEST_ERRORS, V1_ERRORS, characters, check_limit, check_text_lengths, pairs

router = APIRouter(prefix="/v1/domains", tags=["domains"], dependencies=[Depends(require_tenant)], responses=V1_ERRORS)

_NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse, "description": "Unknown domain"}}
_CONFLICT: dict[int | str, dict[str, object]] = {
    409: {"model": ErrorResponse, "description": "expected_version is not the domain's version"}
}


def _not_found(domain_id: str) -> ApiError:
    return ApiError(
        404,
        "domain_not_found",
        f"no domain {domain_id!r}",
        "domain_id",
        "use a domain_id returned by POST /v1/domains (see GET /v1/domains)",
    )


def _conflict(domain_id: str, current: int, expected: int | None) -> ApiError:
    expected_text = f"expected version {expected}" if expected is not None else "the version this update read"
    return ApiError(
        409,
        "version_conflict",
        f"domain {domain_id!r} is at version {current}, not {expected_text}",
        "expected_version",
        f"GET /v1/domains/{domain_id} (and its /examples), then retry with expected_version={current}",
    )


def _too_many_domains(limit: int) -> ApiError:
    return ApiError(
        422,
        "too_many_domains",
        f"this API key already keeps {limit} domains, the most this server allows per tenant",
        "domains",
        "DELETE /v1/domains/{domain_id} a domain you no longer need "
        "(or raise the server setting METASENT_MAX_DOMAINS_PER_TENANT)",
    )


IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as an HTTP token
IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        description="Makes the write safe to retry: a retry with the same key and body gets the first answer "
        "(same domain, same status) and writes nothing; the same key with another body answers 422. "
        "1-255 visible ASCII characters, e.g. a UUID; kept METASENT_IDEMPOTENCY_TTL_S (24 h).",
    ),
]


def _idempotency(
    header: str | None, method: str, path: str, body: BaseModel, answer_status: int, settings: Settings
) -> IdempotencyKey | None:
    """The request's :class:`IdempotencyKey` (``None`` without the header); its hash covers the
    method, the path and the canonical JSON of the parsed body."""
    if header is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(header):
        raise ApiError(
            422,
            "invalid_request",
            f"the {IDEMPOTENCY_HEADER} header must be 1-255 visible ASCII characters",
            IDEMPOTENCY_HEADER,
            "send a fresh random key per write, e.g. a UUID, and the same key when you retry it",
        )
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()
    return IdempotencyKey(header, digest, answer_status, settings.idempotency_ttl_s)


def _key_reused() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"this {IDEMPOTENCY_HEADER} was already used with another request (method, path or body)",
        IDEMPOTENCY_HEADER,
        f"send a new {IDEMPOTENCY_HEADER} for a new request; reuse a key only to retry the identical request",
    )


def _replayed(replay: domain_writes.Replay) -> JSONResponse:
    """The stored answer of an idempotent write, again."""
    headers = {"Idempotent-Replayed": "true"}
    if replay.status == status.HTTP_201_CREATED:
        headers["Location"] = f"/v1/domains/{replay.body['domain_id']}"
    return JSONResponse(replay.body, status_code=replay.status, headers=headers)


def _answered_domain_deleted(domain_id: str) -> ApiError:
    return ApiError(
        409,
        "idempotent_domain_deleted",
        f"this {IDEMPOTENCY_HEADER} already wrote domain {domain_id!r}, which was deleted since",
        IDEMPOTENCY_HEADER,
        f"send a new {IDEMPOTENCY_HEADER} to write the domain again (POST /v1/domains for a new one)",
    )


@contextmanager
def _store_errors(domain_id: str | None = None, expected: int | None = None, limit: int = 0) -> Iterator[None]:
    """The store's and the domain writes' (:mod:`app.domains`) exceptions as HTTP answers."""
    try:
        yield
    except DomainNotFoundError:
        raise _not_found(domain_id or "") from None
    except VersionConflictError as error:
        raise _conflict(domain_id or "", error.current, expected) from None
    except DomainLimitError:
        raise _too_many_domains(limit) from None
    except IdempotencyMismatchError:
        raise _key_reused() from None
    except domain_writes.AnsweredDomainDeletedError as error:
        raise _answered_domain_deleted(error.domain_id) from None


async def _require(store: DomainStore, tenant: str, domain_id: str, with_examples: bool = False) -> StoredDomain:
    with _store_errors(domain_id):
        return await domain_writes.require(store, tenant, domain_id, with_examples)


async def _fresh(
    service: ModelService,
    store: DomainStore,
    queue: AdaptationQueue,
    tenant: str,
    domain_id: str,
    with_examples: bool = False,
) -> StoredDomain:
    """The tenant's domain, re-adapted first (through the adaptation queue: 429 when it is full)
    when another checkpoint adapted it: never one adapted on another checkpoint (409 when other
    writes kept winning the re-adaptation). With ``with_examples``, its support set too."""
    domain = await _require(store, tenant, domain_id, with_examples)
    try:
        return await refresh_queued(queue, service, store, domain)
    except DomainNotFoundError:
        raise _not_found(domain_id) from None
    except VersionConflictError as error:
        raise _conflict(domain_id, error.current, None) from None


async def _with_state(
    service: ModelService,
    store: DomainStore,
    queue: AdaptationQueue,
    tenant: str,
    domain_id: str,
    with_examples: bool = False,
) -> tuple[StoredDomain, AdaptedState]:
    """The fresh domain (with its support set if ``with_examples``) and its adapted state, both of
    one version (read again if a concurrent update changed it)."""
    for _ in range(3):
        domain = await _fresh(service, store, queue, tenant, domain_id, with_examples)
        try:
            tensors = await run_in_threadpool(store.params, domain)
        except DomainNotFoundError:
            continue
        return domain, service.state(tensors, domain.labels)
    raise _conflict(domain_id, domain.version, None)


def _public(domain: StoredDomain, service: ModelService) -> Domain:
    return Domain(**domain.public(service.checkpoint_hash))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Domain, responses={**REQUEST_ERRORS, **QUEUE_FULL})
async def create_domain(
    body: CreateDomain,
    response: Response,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    tenant: TenantDep,
    adapt_queue: AdaptQueueDep,
    idempotency_key: IdempotencyHeader = None,
) -> Domain | JSONResponse:
    """Adapt a new domain: run the served model's inner loop on the examples (its head built from
    them, then the SGD steps, if any, that the model's ``inner_loop`` sets; the answer's
    ``adaptation.steps`` says how many ran), and store the domain with its support set. With an
    ``Idempotency-Key``, a retry gets the first answer and creates nothing."""
    key = _idempotency(idempotency_key, "POST", "/v1/domains", body, status.HTTP_201_CREATED, settings)

    def support_set() -> Examples:
        check_limit(len(body.examples), settings.max_examples, "examples", "MAX_EXAMPLES")
        check_text_lengths(body.examples, settings.max_text_chars)
        return pairs(body.examples)

    limit = settings.max_domains_per_tenant
    with _store_errors(limit=limit):
        domain = await domain_writes.create(
            service, store, adapt_queue, tenant, body.name, support_set, limit=limit, key=key
        )  # 429 when the adaptation queue is full
    if isinstance(domain, domain_writes.Replay):
        return _replayed(domain)
    response.headers["Location"] = f"/v1/domains/{domain.domain_id}"
    return _public(domain, service)


@router.get("", response_model=DomainList)
async def list_domains(store: StoreDep, service: ServiceDep, tenant: TenantDep) -> DomainList:
    """Your domains (metadata only; ``stale`` ones are re-adapted on their next use)."""
    return DomainList(domains=[_public(d, service) for d in await run_in_threadpool(store.list, tenant)])


@router.get("/{domain_id}", response_model=Domain, responses={**_NOT_FOUND, **QUEUE_FULL})
async def get_domain(
    domain_id: str, store: StoreDep, service: ServiceDep, tenant: TenantDep, adapt_queue: AdaptQueueDep
) -> Domain:
    """One domain's metadata (a stale domain is re-adapted first)."""
    return _public(await _fresh(service, store, adapt_queue, tenant, domain_id), service)


@router.get("/{domain_id}/examples", response_model=DomainExamples, responses=_NOT_FOUND)
async def get_examples(domain_id: str, store: StoreDep, tenant: TenantDep) -> DomainExamples:
    """The domain's stored support set and its version."""
    domain = await _require(store, tenant, domain_id, with_examples=True)
    examples = [LabelledText(text=t, label=lab) for t, lab in domain.examples or []]
    return DomainExamples(domain_id=domain_id, version=domain.version, examples=examples)


def _merged(domain: StoredDomain, body: UpdateExamples, settings: Settings) -> Examples:
    """The support set after ``body``; raises 413/422 naming ``examples`` when it is not usable."""
    check_text_lengths(body.examples, settings.max_text_chars)
    examples = (list(domain.examples or []) if body.mode == "add" else []) + pairs(body.examples)
    check_limit(len(examples), settings.max_examples, "examples", "MAX_EXAMPLES")
    if len({label for _, label in examples}) < 2:
        raise ApiError(
            422,
            "invalid_request",
            f"the support set after this {body.mode} has fewer than 2 distinct labels",
            "examples",
            "send examples of at least 2 distinct labels (with mode 'replace', the whole new support set)",
        )
    return examples


@router.put(
    "/{domain_id}/examples",
    response_model=Domain,
    responses={**REQUEST_ERRORS, **_NOT_FOUND, **_CONFLICT, **QUEUE_FULL},
)
async def update_examples(
    domain_id: str,
    body: UpdateExamples,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    tenant: TenantDep,
    adapt_queue: AdaptQueueDep,
    idempotency_key: IdempotencyHeader = None,
) -> Domain | JSONResponse:
    """Add examples to the domain's support set (``mode: add``) or replace it (``mode:
    replace``), re-adapt, and store the result as the next version. With ``expected_version``,
    the update is refused (409) unless the domain is still at that version. With an
    ``Idempotency-Key``, a retry gets the first answer and changes nothing."""
    path = f"/v1/domains/{domain_id}/examples"
    key = _idempotency(idempotency_key, "PUT", path, body, status.HTTP_200_OK, settings)
    with _store_errors(domain_id, body.expected_version):
        stored = await domain_writes.update(
            service,
            store,
            adapt_queue,
            tenant,
            domain_id,
            lambda domain: _merged(domain, body, settings),
            expected_version=body.expected_version,
            key=key,
        )  # 429 when the adaptation queue is full
    if isinstance(stored, domain_writes.Replay):
        return _replayed(stored)
    return _public(stored, service)


@router.delete("/{domain_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
async def delete_domain(domain_id: str, store: StoreDep, tenant: TenantDep) -> Response:
    """Forget a domain, its support set and its adapted parameters."""
    if not domain_writes.DOMAIN_ID.fullmatch(domain_id) or not await run_in_threadpool(store.delete, tenant, domain_id):
        raise _not_found(domain_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{domain_id}/classify", response_model=ClassifyResponse, responses={**REQUEST_ERRORS, **_NOT_FOUND, **QUEUE_FULL}
)
async def classify(
    domain_id: str,
    body: ClassifyRequest,
    batcher: BatcherDep,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    tenant: TenantDep,
    adapt_queue: AdaptQueueDep,
    budget: CharBudgetDep,
) -> ClassifyResponse:
    """Classify texts with a domain's adapted parameters; predictions come in input order, each
    with ``truncated`` when its text was cut to the encoder's limit."""
    check_limit(len(body.texts), settings.max_texts, "texts", "MAX_TEXTS")
    with budget.admit(characters(body.texts), "texts"):  # 413/503: the server's memory bound
        domain, state = await _with_state(service, store, adapt_queue, tenant, domain_id)
        key = service.batch_key(state, domain_id)  # head-only domains share the encoder pass
        probs, truncated = await asyncio.gather(  # (texts, classes); per text
            batcher.classify(key, state, body.texts), run_in_threadpool(service.truncated, body.texts)
        )
    return ClassifyResponse(
        domain_id=domain_id,
        predictions=predictions(domain.labels, probs, truncated),  # type: ignore[arg-type]
    )


SUGGEST_METHOD = "badge"
"""BADGE (Ash et al. 2020): uncertainty with diversity, see :mod:`meta.active`."""


@router.post(
    "/{domain_id}/suggest", response_model=SuggestResponse, responses={**REQUEST_ERRORS, **_NOT_FOUND, **QUEUE_FULL}
)
async def suggest(
    domain_id: str,
    body: SuggestRequest,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    tenant: TenantDep,
    adapt_queue: AdaptQueueDep,
    budget: CharBudgetDep,
) -> SuggestResponse:
    """What to label next: the ``k`` texts among ``texts`` whose labels would most improve the
    domain, chosen by BADGE (Ash et al. 2020, "Deep Batch Active Learning by Diverse, Uncertain
    Gradient Lower Bounds"): uncertain under the domain's current model and unlike each other.
    Duplicates and texts already in the support set are never suggested. Label them and add them
    with ``PUT /v1/domains/{domain_id}/examples``."""
    check_limit(len(body.texts), settings.max_texts, "texts", "MAX_TEXTS")
    with budget.admit(characters(body.texts), "texts"):  # 413/503: the server's memory bound
        domain, state = await _with_state(service, store, adapt_queue, tenant, domain_id, with_examples=True)
        labelled = [text for text, _ in domain.examples or []]  # the support set ``state`` was adapted on
        picks = await run_in_threadpool(service.suggest, state, body.texts, body.k, labelled)
    return SuggestResponse(
        domain_id=domain_id,
        method=SUGGEST_METHOD,
        suggestions=[
            SuggestedText(
                index=pick.index,
                text=pick.text,
                label=domain.labels[int(pick.probabilities.argmax())],
                scores={label: round(float(p), 6) for label, p in zip(domain.labels, pick.probabilities, strict=True)},
                uncertainty=round(pick.uncertainty, 6),
            )
            for pick in picks
        ],
    )
