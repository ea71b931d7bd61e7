"""``/healthz``: liveness and what model is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """``status: ok`` once the model is loaded."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return Health(status="starting", model_loaded=False)
    settings = request.app.state.settings
    return Health(
        status="ok",
        model_loaded=True,
        algorithm=service.config.algorithm,
        encoder=service.config.encoder.name_or_path,
        checkpoint=str(settings.checkpoint) if settings.checkpoint else None,
        device=service.device,
        domains=len(request.app.state.store),
    )
