"""``/readyz`` (ready for traffic) and ``/metrics`` (Prometheus), for orchestrators and scrapers.

``/readyz`` is always open; who may read ``/metrics`` is ``METASENT_OPS_ACCESS`` (and with
``METASENT_METRICS_PORT`` it moves to its own port): :func:`app.main.create_app` wires both."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..schemas import Readiness
from ..storage import DomainStore

router = APIRouter(tags=["operations"])
logger = logging.getLogger(__name__)


async def store_reachable(store: DomainStore | None) -> bool:
    """Whether the domain store answers :meth:`DomainStore.ping` (run in a worker thread); ``False``
    before the store is opened."""
    if store is None:
        return False
    try:
        await run_in_threadpool(store.ping)
    except Exception:  # noqa: BLE001 - any failure means not reachable
        logger.warning("store ping failed", exc_info=True)
        return False
    return True


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: the model is loading or the store is down"}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and the domain store is reachable; 503 (same body) otherwise."""
    state = request.app.state
    checks = {
        "model_loaded": getattr(state, "service", None) is not None,
        "store_reachable": await store_reachable(getattr(state, "store", None)),
    }
    ready = all(checks.values())
    body = Readiness(status="ready" if ready else "not_ready", **checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


metrics_router = APIRouter(tags=["operations"])


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format (rendered in a worker thread: the domains
    gauge counts rows in the store's database). Figures are of every tenant: with API keys, a key
    is needed unless the server's ``METASENT_OPS_ACCESS`` is ``open``."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
