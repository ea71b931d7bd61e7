"""``/healthz``: liveness and what model is loaded."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from ..schemas import Health
from ..store import DomainStore

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


def _domains(store: DomainStore) -> int | None:
    """Domains of every tenant; ``None`` when the database does not answer (liveness does not
    depend on it: ``/readyz`` reports the store)."""
    try:
        return len(store)
    except SQLAlchemyError:
        logger.warning("healthz: the domain store did not answer", exc_info=True)
        return None


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """``status: ok`` once the model is loaded (liveness; ``/readyz`` also checks the store)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return Health(status="starting", model_loaded=False)
    return Health(
        status="ok",
        model_loaded=True,
        model=service.config.name or (service.checkpoint.name if service.checkpoint else None),
        algorithm=service.config.algorithm,
        encoder=service.config.encoder.name_or_path,
        checkpoint=str(service.checkpoint) if service.checkpoint else None,
        checkpoint_hash=service.checkpoint_hash,
        device=service.device,
        domains=await run_in_threadpool(_domains, request.app.state.store),
    )
