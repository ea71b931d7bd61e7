"""``/v1/classify``: adapt on a support set and classify texts in one call, storing nothing."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ..adaptation import adapt_queued, predictions
from ..auth import require_tenant
from ..dependencies import AdaptQueueDep, CharBudgetDep, ServiceDep, SettingsDep
from ..schemas import AdaptAndClassify, AdaptAndClassifyResponse
from ..service import support_warnings
from .common import QUEUE_FULL, REQUEST_ERRORS, V1_ERRORS, characters, check_limit, check_text_lengths, pairs

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_tenant)], responses=V1_ERRORS)


@router.post("/classify", response_model=AdaptAndClassifyResponse, responses={**REQUEST_ERRORS, **QUEUE_FULL})
async def adapt_and_classify(
    body: AdaptAndClassify,
    service: ServiceDep,
    settings: SettingsDep,
    adapt_queue: AdaptQueueDep,
    budget: CharBudgetDep,
) -> AdaptAndClassifyResponse:
    """Adapt on ``examples`` with the checkpoint's inner loop (through the adaptation queue: 429
    when it is full), classify ``texts`` with the adapted parameters, and forget them: no domain
    is created. Each prediction says whether its text was ``truncated``. The request's characters
    count against the server's budget while it runs (413/503, :class:`app.limits.CharBudget`)."""
    check_limit(len(body.examples), settings.max_examples, "examples", "MAX_EXAMPLES")
    check_limit(len(body.texts), settings.max_texts, "texts", "MAX_TEXTS")
    check_text_lengths(body.examples, settings.max_text_chars)
    with budget.admit(characters(body.texts, body.examples), "texts"):
        state = await adapt_queued(adapt_queue, service, pairs(body.examples))
        probs, truncated = await asyncio.gather(  # (texts, classes); per text
            run_in_threadpool(service.classify, state, body.texts),
            run_in_threadpool(service.truncated, body.texts),
        )
    return AdaptAndClassifyResponse(
        labels=list(state.labels),
        predictions=predictions(state.labels, probs, truncated),  # type: ignore[arg-type]
        adaptation=service.info(state, [ex.label for ex in body.examples]),  # type: ignore[arg-type]
        warnings=support_warnings([ex.label for ex in body.examples]),  # type: ignore[arg-type]
    )
