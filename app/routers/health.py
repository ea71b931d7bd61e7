"""``/healthz``: liveness and what model is loaded. Open to anyone (orchestrators probe it), so it
shows no figure of any tenant's data and no file-system path: the domain count and the checkpoint
directory are on ``/metrics`` (``metasent_domains``, ``metasent_model_info``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from ..schemas import Health

router = APIRouter(tags=["health"])


def public_name(name: str | None) -> str | None:
    """``name`` as ``/healthz`` shows it: a local path (an encoder or checkpoint directory) by its
    last part only; a hub id (``sentence-transformers/all-MiniLM-L6-v2``) as it is."""
    if name is None:
        return None
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


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
        encoder=public_name(service.config.encoder.name_or_path),
        checkpoint_hash=service.checkpoint_hash,
        device=service.device,
    )
