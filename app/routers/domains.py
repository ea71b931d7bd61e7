"""``/v1/domains``: adapt a domain from a support set, list, show, delete, classify."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response, status
from starlette.concurrency import run_in_threadpool

from app.batching import SHARED_ENCODER
from app.dependencies import AdaptQueueDep, BatcherDep, ServiceDep, SettingsDep, StoreDep
from app.errors import ApiError
from app.schemas import ClassifyRequest, ClassifyResponse, CreateDomain, Domain, DomainList, ErrorResponse
from app.service import DomainStore, StoredDomain
from meta.inner_loop import is_head_only

router = APIRouter(prefix="/v1/domains", tags=["domains"])

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    413: {"model": ErrorResponse, "description": "More examples or texts, or a larger body, than the server's limits"},
    422: {"model": ErrorResponse, "description": "Invalid field (the error names it and the fix)"},
    503: {"model": ErrorResponse, "description": "The request took longer than the server's timeout (Retry-After)"},
}
_QUEUE_FULL: dict[int | str, dict[str, object]] = {
    429: {"model": ErrorResponse, "description": "The adaptation queue is full (Retry-After)"}
}
_NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse, "description": "Unknown domain"}}


def _require(store: DomainStore, domain_id: str) -> StoredDomain:
    domain = store.get(domain_id)
    if domain is None:
        raise ApiError(
            404,
            "domain_not_found",
            f"no domain {domain_id!r}",
            "domain_id",
            "use a domain_id returned by POST /v1/domains (see GET /v1/domains)",
        )
    return domain


def _check_limit(count: int, limit: int, field: str, setting: str) -> None:
    if count > limit:
        raise ApiError(
            413,
            "too_many_items",
            f"{count} {field}; this server accepts at most {limit}",
            field,
            f"send at most {limit} {field} per request (server setting METASENT_{setting})",
        )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Domain, responses={**_ERRORS, **_QUEUE_FULL})
async def create_domain(
    body: CreateDomain,
    response: Response,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    adapt_queue: AdaptQueueDep,
) -> Domain:
    """Adapt a new domain: run the checkpoint's inner loop (prototype-initialised head, then k SGD
    steps on the support loss) on the examples, and keep the adapted parameters."""
    _check_limit(len(body.examples), settings.max_examples, "examples", "MAX_EXAMPLES")
    if len(store) >= settings.max_domains:
        raise ApiError(
            422,
            "too_many_domains",
            f"this server keeps at most {settings.max_domains} domains",
            "domains",
            "DELETE /v1/domains/{domain_id} a domain you no longer need",
        )
    texts = [ex.text for ex in body.examples]
    labels = [ex.label for ex in body.examples]
    adaptation = await adapt_queue.run(service.adapt, texts, labels)  # 429 when full
    domain = store.add(body.name, adaptation, len(texts), service.device)
    response.headers["Location"] = f"/v1/domains/{domain.domain_id}"
    return Domain(**domain.public())


@router.get("", response_model=DomainList)
async def list_domains(store: StoreDep) -> DomainList:
    """Every adapted domain (metadata only)."""
    return DomainList(domains=[Domain(**d.public()) for d in store.list()])


@router.get("/{domain_id}", response_model=Domain, responses=_NOT_FOUND)
async def get_domain(domain_id: str, store: StoreDep) -> Domain:
    """One domain's metadata."""
    return Domain(**_require(store, domain_id).public())


@router.delete("/{domain_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
async def delete_domain(domain_id: str, store: StoreDep) -> Response:
    """Forget a domain and its adapted parameters."""
    _require(store, domain_id)
    store.delete(domain_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{domain_id}/classify", response_model=ClassifyResponse, responses={**_ERRORS, **_NOT_FOUND})
async def classify(
    domain_id: str,
    body: ClassifyRequest,
    batcher: BatcherDep,
    service: ServiceDep,
    store: StoreDep,
    settings: SettingsDep,
) -> ClassifyResponse:
    """Classify texts with a domain's adapted parameters; predictions come in input order."""
    domain = _require(store, domain_id)
    _check_limit(len(body.texts), settings.max_texts, "texts", "MAX_TEXTS")
    key = SHARED_ENCODER if is_head_only(domain.params) else domain_id  # head-only domains share the encoder pass
    probs, truncated = await asyncio.gather(  # (texts, classes); per text
        batcher.classify(key, domain.params, body.texts), run_in_threadpool(service.truncated, body.texts)
    )
    predictions = [
        {
            "label": domain.labels[int(row.argmax())],
            "scores": {label: round(float(p), 6) for label, p in zip(domain.labels, row, strict=True)},
            "truncated": cut,
        }
        for row, cut in zip(probs, truncated, strict=True)
    ]
    return ClassifyResponse(domain_id=domain_id, predictions=predictions)  # type: ignore[arg-type]
