"""The FastAPI application factory."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import Depends, FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from .adaptation import readapt_all
from .auth import KeyRing, require_tenant
from .batching import MicroBatcher
from .errors import install_error_handlers
from .limits import BodyLimitMiddleware, CharBudget, HeaderLimitMiddleware, TimeoutMiddleware
from .metrics import Metrics, MetricsMiddleware
from .observability import request_id_var
from .queue import AdaptationQueue
from .routers import classify, docs, domains, health, ops, playground
from .service import ModelService
from .settings import Settings, get_settings
from .storage import DomainStore
from .store import SqlDomainStore

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "X-Request-ID"


def _load_service(settings: Settings) -> ModelService:
    import torch

    from metasent.meta.checkpoint import load_model, model_fingerprint, resolve_checkpoint
    from metasent.meta.model import resolve_device, resolve_encoder_path

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    checkpoint = resolve_checkpoint(settings.checkpoint)
    model, config = load_model(checkpoint, settings.encoder, device)
    encoder_path = None if checkpoint else resolve_encoder_path(config.encoder.name_or_path)
    checkpoint_hash = model_fingerprint(checkpoint, config, encoder_path)
    logger.info(
        "model loaded: %s algorithm=%s encoder=%s device=%s inner_loop=%s checkpoint_hash=%s",
        config.name or checkpoint or "un-meta-trained encoder",
        config.algorithm,
        config.encoder.name_or_path,
        device,
        config.inner_loop.model_dump(),
        checkpoint_hash[:12],
    )
    return ModelService(
        model,
        config,
        settings.batch_size,
        settings.max_text_chars,
        checkpoint_hash,
        checkpoint,
        estimate_folds=settings.estimate_folds if settings.estimate else None,
    )


def _open_store(settings: Settings, service: ModelService) -> DomainStore:
    """The domain store (``METASENT_DATABASE_URL``): the one place that names its implementation."""
    store = SqlDomainStore(settings.database(), service.device, settings.cache_domains, settings.migrate_on_start)
    logger.info("domain store: %s (%d domains)", store.location, len(store))
    if settings.readapt_on_load:
        logger.info("re-adapted %d stale domains", readapt_all(service, store))
    return store


async def _request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Echo the client's ``X-Request-ID`` (or a new one) on every response and in the log."""
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    token = request_id_var.set(request_id)  # on every log line of this request
    try:
        start = time.perf_counter()
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        ms = round(1000 * (time.perf_counter() - start), 1)
        logger.info(
            "%s %s -> %d in %.1f ms", request.method, request.url.path, response.status_code, ms,
            extra={"method": request.method, "path": request.url.path, "status": response.status_code, "ms": ms},
        )  # fmt: skip
        return response
    finally:
        request_id_var.reset(token)


def _retry_after(app: FastAPI) -> int:
    queue = getattr(app.state, "adapt_queue", None)
    return queue.retry_after() if queue is not None else 1


@contextmanager
def _metrics_server(settings: Settings, metrics: Metrics) -> Iterator[None]:
    """``/metrics`` on ``METASENT_METRICS_PORT`` (prometheus-client's HTTP server in a thread) while
    the app runs; nothing when the port is not set."""
    if settings.metrics_port is None:
        yield
        return
    from prometheus_client import start_http_server

    server, thread = start_http_server(settings.metrics_port, settings.metrics_host, metrics.registry)
    logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _include_ops_routes(app: FastAPI, settings: Settings) -> None:
    """``/readyz`` (open); ``/metrics``, ``/openapi.json``, ``/docs``, ``/redoc`` behind an API key
    unless ``METASENT_OPS_ACCESS=open``; ``/metrics`` not on this port with ``METASENT_METRICS_PORT``."""
    guard = [] if settings.ops_access == "open" else [Depends(require_tenant)]
    app.include_router(ops.router)
    if settings.metrics_port is None:
        app.include_router(ops.metrics_router, dependencies=guard)
    app.include_router(docs.router, dependencies=guard)
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")  # the public Swagger UI / ReDoc files


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the metasent API. The lifespan loads the model once (``METASENT_CHECKPOINT``: the
    shipped default model, a checkpoint directory, or ``none`` for the bare encoder); every
    domain shares that one base model. It then opens the domain store
    (``METASENT_DATABASE_URL``, default SQLite in ``METASENT_DATA_DIR``).

    Args:
        settings (`Settings`, *optional*): defaults to the ``METASENT_*`` environment.
    """
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        if app.state.keyring.open:
            logger.warning("no METASENT_API_KEYS: the API is open, every client is tenant 'default'")
        else:
            logger.info("API keys: %d tenants", len(settings.key_list()))
        app.state.adapt_queue = AdaptationQueue(settings.adapt_queue_size, metrics.adaptation.observe)
        service = await run_in_threadpool(_load_service, settings)
        checkpoint = str(service.checkpoint) if service.checkpoint else None
        metrics.set_model(service.config.algorithm, service.config.encoder.name_or_path, service.device, checkpoint)
        app.state.store = await run_in_threadpool(_open_store, settings, service)
        app.state.service = service
        app.state.batcher = MicroBatcher(
            service.classify_many,
            settings.batch_window_ms / 1000,
            max(settings.max_texts, settings.batch_size),
        )
        try:
            with _metrics_server(settings, metrics):
                yield
        finally:
            app.state.store.close()

    app = FastAPI(
        title="metasent",
        version="0.1.0",
        summary="Few-shot sentiment adaptation: post a small support set, get a classifier for that domain.",
        lifespan=lifespan,
        redirect_slashes=False,  # no 307 to a Location built from the client's Host header: 404 instead
        openapi_url=None,  # /openapi.json, /docs and /redoc: routers/docs.py (local assets, access setting)
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.keyring = KeyRing(settings.key_list())
    app.state.metrics = metrics
    app.state.char_budget = CharBudget(settings.max_request_chars, settings.max_inflight_chars)
    metrics.bind(app.state)
    install_error_handlers(app)
    # innermost first: timeout, body limit and body time, header limit, metrics, then the request id
    app.add_middleware(TimeoutMiddleware, seconds=settings.request_timeout_s, retry_after=lambda: _retry_after(app))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.middleware("http")(_request_id)
    app.include_router(health.router)
    _include_ops_routes(app, settings)
    app.include_router(domains.router)
    app.include_router(classify.router)
    app.include_router(playground.router)  # GET /: the playground page, no API key, not in the schema
    app.mount(playground.STATIC_PATH, playground.static_files(), name="static")
    return app
