"""Prometheus metrics (prometheus-client), one registry per app, served at ``/metrics``.

Requests are counted and timed by route template (``/v1/domains/{domain_id}``, never the raw
path) and status; adaptations by seconds; the adaptation queue depth and the stored domains are
read at scrape time; the model (algorithm, encoder, device) is an info metric.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ADAPTATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
UNMATCHED = "unmatched"


class Metrics:
    """The service's metrics in their own registry (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "metasent_http_requests", "HTTP requests by route template and status", labels, registry=self.registry
        )
        self.latency = Histogram(
            "metasent_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.adaptation = Histogram(
            "metasent_adaptation_seconds",
            "Wall seconds of each adaptation (inner loop) run by the queue",
            buckets=ADAPTATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "metasent_adaptation_queue_depth", "Adaptations waiting or running", registry=self.registry
        )
        self.domains = Gauge("metasent_domains", "Adapted domains stored, of every tenant", registry=self.registry)
        self.model = Info("metasent_model", "The loaded model", registry=self.registry)

    def bind(self, state: Any) -> None:
        """Read the queue depth and the domain count from ``app.state`` at scrape time."""
        self.queue_depth.set_function(lambda: float(getattr(getattr(state, "adapt_queue", None), "depth", 0)))
        self.domains.set_function(lambda: _count(getattr(state, "store", None)))

    def set_model(self, algorithm: str, encoder: str, device: str, checkpoint: str | None) -> None:
        self.model.info({"algorithm": algorithm, "encoder": encoder, "device": device, "checkpoint": checkpoint or ""})


def _count(store: Any) -> float:
    try:
        return float(len(store)) if store is not None else math.nan
    except Exception:  # noqa: BLE001 - a store that cannot count (or is unreachable) reads as NaN
        return math.nan


def route_template(scope: Scope) -> str:
    """The path template of the route that handled (or would handle) the request."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches(scope)
        if match != Match.NONE and isinstance(getattr(candidate, "path", None), str):
            return candidate.path
    return UNMATCHED


class MetricsMiddleware:
    """Count and time every HTTP request by method, route template and status.

    Args:
        app (`ASGIApp`): the wrapped application.
        metrics (`Metrics`): where to record.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app raises before answering
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = (scope["method"], route_template(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
