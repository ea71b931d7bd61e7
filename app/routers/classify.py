"""``/v1/classify``: adapt on a support set and classify texts in one call, storing nothing."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from app.adaptation import adapt, predictions
from app.auth import require_tenant
from app.dependencies import ServiceDep, SettingsDep
from app.routers.domains import AUTH_ERRORS, REQUEST_ERRORS, check_limit, pairs
from app.schemas import AdaptAndClassify, AdaptAndClassifyResponse
from app.store import adaptation_info

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_tenant)], responses=AUTH_ERRORS)


@router.post("/classify", response_model=AdaptAndClassifyResponse, responses=REQUEST_ERRORS)
async def adapt_and_classify(
    body: AdaptAndClassify, service: ServiceDep, settings: SettingsDep
) -> AdaptAndClassifyResponse:
    """Adapt on ``examples`` with the checkpoint's inner loop, classify ``texts`` with the
    adapted parameters, and forget them: no domain is created."""
    check_limit(len(body.examples), settings.max_examples, "examples", "MAX_EXAMPLES")
    check_limit(len(body.texts), settings.max_texts, "texts", "MAX_TEXTS")
    adaptation = await run_in_threadpool(adapt, service, settings, pairs(body.examples))
    probs = await run_in_threadpool(service.classify, adaptation.params, body.texts)  # (texts, classes)
    info = adaptation_info(adaptation, service.device)
    return AdaptAndClassifyResponse(
        labels=list(adaptation.labels),
        predictions=predictions(adaptation.labels, probs),  # type: ignore[arg-type]
        adaptation=info,  # type: ignore[arg-type]
    )
