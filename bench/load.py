"""Load test: concurrent clients mixing adaptations and classifications against a metasent server
on the loopback interface for a fixed duration.

    python -m bench.load --threads 1                    # starts `metasent serve` itself (default model)
    python -m bench.load --url http://127.0.0.1:8000    # or targets a running server
    python -m bench.load --replicas 2 --threads 1 \
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test   # two replicas, one PostgreSQL

Each client loops until ``--duration`` ends: with probability ``--adapt-share`` it adapts a new
domain on 10 gourmet food reviews (5 per label, resampled each time) and deletes it again (so the
store stays bounded); otherwise it classifies ``--texts`` reviews with the shared domain. A 429
(the adaptation queue is full) is deliberate back-pressure: the client waits its ``Retry-After``
(at most 5 s) and goes on. Prints and writes (``--output``) request counts, status counts and
p50/p99 latency per operation; exits 1 on any other error (unexpected status, timeout, connection
error). Reviews come from ARSC (``--arsc``) or, without it, from a small built-in set.

The servers this command starts (``--replicas``, on ports ``--port``, ``--port`` + 1, ...) share one
fresh store, so a run never sees an earlier run's domains: with ``--database-url`` (PostgreSQL) a new
schema ``load_<hex>`` in that database, first on every connection's ``search_path`` and dropped after
the run; else a SQLite file in ``--data-dir`` (default a new temporary directory). Clients are spread
round-robin over the servers (client ``i`` talks to server ``i mod n``; repeat ``--url`` to target
several running replicas), and the report counts requests per server. With ``--api-key`` (or
``METASENT_API_KEY``) every request sends that key, and a server this command starts accepts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.server import local_server

logger = logging.getLogger("bench.load")

EXPECTED = {"adapt": {201, 429}, "classify": {200}, "delete": {204}}
FALLBACK = {
    "positive": [
        "delicious coffee, rich and smooth, will buy again",
        "the best dark chocolate i have had in years",
        "fresh, crunchy and not too salty",
        "lovely olive oil, peppery and green",
        "great tea, fragrant and strong",
        "my kids love these snacks",
    ],
    "negative": [
        "stale crackers, arrived broken and tasted of cardboard",
        "way too salty and the tea bags leaked",
        "the jam was mouldy when it arrived",
        "bitter, burnt coffee and overpriced",
        "tasteless pasta that fell apart",
        "the box was crushed and the cookies stale",
    ],
}


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # 2xx answers
    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: list[str] = field(default_factory=list)
    servers: Counter[str] = field(default_factory=Counter)  # requests per base URL

    def record(self, operation: str, seconds: float, status: int | str, server: str = "") -> None:
        self.servers[server] += 1
        if isinstance(status, int) and 200 <= status < 300:
            self.latencies[operation].append(seconds)
        self.statuses[operation][str(status)] += 1
        if status not in EXPECTED[operation]:
            self.errors.append(f"{operation}: {status}")


def reviews(arsc: Path | None, seed: int) -> dict[str, list[str]]:
    """Gourmet food reviews by label (ARSC when given and present, else the built-in set)."""
    if arsc is None or not arsc.exists():
        return FALLBACK
    from metasent.data.readers import read_arsc

    (task,) = [t for t in read_arsc(arsc, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    by_label: dict[str, list[str]] = defaultdict(list)
    for split in ("train", "dev", "test"):
        for example in task.split(split):
            by_label[example.label].append(example.text)
    return dict(by_label)


def support_set(pool: dict[str, list[str]], rng: random.Random, k: int = 5) -> list[dict[str, str]]:
    return [{"text": t, "label": label} for label, texts in pool.items() for t in rng.sample(texts, k)]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


async def timed(client: httpx.AsyncClient, stats: Stats, operation: str, method: str, path: str, **kw: Any) -> Any:
    start = time.perf_counter()
    server = str(client.base_url).rstrip("/")
    try:
        response = await client.request(method, path, **kw)
    except httpx.HTTPError as error:
        stats.record(operation, time.perf_counter() - start, type(error).__name__, server)
        return None
    stats.record(operation, time.perf_counter() - start, response.status_code, server)
    if response.status_code not in EXPECTED[operation] and len(stats.errors) <= 20:
        logger.error("%s %s -> %d %s", method, path, response.status_code, response.text[:300])
    return response


async def worker(
    client: httpx.AsyncClient,
    stats: Stats,
    pool: dict[str, list[str]],
    domain_id: str,
    deadline: float,
    adapt_share: float,
    n_texts: int,
    seed: int,
) -> None:
    rng = random.Random(seed)
    all_texts = [t for texts in pool.values() for t in texts]
    while time.monotonic() < deadline:
        if rng.random() < adapt_share:
            body = {"name": "load", "examples": support_set(pool, rng)}
            response = await timed(client, stats, "adapt", "POST", "/v1/domains", json=body)
            if response is not None and response.status_code == 201:
                await timed(client, stats, "delete", "DELETE", f"/v1/domains/{response.json()['domain_id']}")
            elif response is not None and response.status_code == 429:
                await asyncio.sleep(min(5.0, float(response.headers.get("Retry-After", "1"))))
        else:
            body = {"texts": rng.sample(all_texts, n_texts)}
            await timed(client, stats, "classify", "POST", f"/v1/domains/{domain_id}/classify", json=body)


async def run_load(urls: str | Sequence[str], pool: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.clients`` clients for ``args.duration`` seconds, spread round-robin over ``urls``
    (one server, or replicas sharing one store), and summarise what they saw.

    The shared domain the classify requests use is created on the first server; the others load it
    from the store. Returns the summary :func:`summarize` builds.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    stats = Stats()
    limits = httpx.Limits(max_connections=args.clients + 4)
    api_key = getattr(args, "api_key", None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=headers)
            )
            for url in urls
        ]
        health = (await clients[0].get("/healthz")).json()
        body = {"name": "shared", "examples": support_set(pool, random.Random(0))}
        shared = await clients[0].post("/v1/domains", json=body)
        shared.raise_for_status()
        domain_id = shared.json()["domain_id"]
        start = time.monotonic()
        deadline = start + args.duration
        await asyncio.gather(
            *[
                worker(
                    clients[i % len(clients)],
                    stats,
                    pool,
                    domain_id,
                    deadline,
                    args.adapt_share,
                    args.texts,
                    args.seed + i,
                )
                for i in range(args.clients)
            ]
        )
        elapsed = time.monotonic() - start
        await clients[0].delete(f"/v1/domains/{domain_id}")
        metrics = [(await client.get("/metrics")).text for client in clients]
    return summarize(stats, elapsed, health, metrics, args)


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def summarize(
    stats: Stats, elapsed: float, health: dict, metrics: str | list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Counts, statuses and p50/p99/max latency (of the 2xx answers) per operation; requests per
    server; the servers' mean adaptation time (``metrics``: each server's ``/metrics`` text)."""
    metrics = [metrics] if isinstance(metrics, str) else metrics
    operations: dict[str, Any] = {}
    for operation, statuses in sorted(stats.statuses.items()):
        ok = stats.latencies.get(operation) or [float("nan")]
        operations[operation] = {
            "requests": sum(statuses.values()),
            "statuses": dict(sorted(statuses.items())),
            "p50_ms": round(1000 * percentile(ok, 0.50), 1),  # of the 2xx answers
            "p99_ms": round(1000 * percentile(ok, 0.99), 1),
            "max_ms": round(1000 * max(ok), 1),
        }
    total = sum(sum(s.values()) for s in stats.statuses.values())
    adapt_count = sum(_metric(text, "metasent_adaptation_seconds_count") or 0.0 for text in metrics)
    adapt_sum = sum(_metric(text, "metasent_adaptation_seconds_sum") or 0.0 for text in metrics)
    return {
        "server": {k: health.get(k) for k in ("model", "algorithm", "encoder", "checkpoint_hash", "device")},
        "servers": len(metrics),
        "requests_per_server": dict(sorted(stats.servers.items())),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "adapt_share": args.adapt_share,
        "texts_per_classify": args.texts,
        "requests": total,
        "requests_per_s": round(total / elapsed, 2),
        "operations": operations,
        "server_adaptation_seconds_mean": round(adapt_sum / adapt_count, 3) if adapt_count and adapt_sum else None,
        "errors": len(stats.errors),
        "error_samples": sorted(Counter(stats.errors).items())[:10],
    }


@contextmanager
def fresh_schema(database_url: str) -> Iterator[str]:
    """A new schema ``load_<hex>`` in the PostgreSQL database of ``database_url``, dropped with its
    tables on exit.

    Args:
        database_url (`str`): SQLAlchemy URL of a PostgreSQL database the user may create schemas in.

    Yields:
        `str`: ``database_url`` whose connections put the new schema first on their ``search_path``
        (libpq ``options=-csearch_path=...``), so the servers' migrations and tables land there.

    Raises:
        ValueError: when ``database_url`` is not a PostgreSQL URL.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"--database-url must be a PostgreSQL URL, not {url.get_backend_name()}")
    schema = f"load_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        logger.info("fresh schema %s in %s", schema, url.render_as_string(hide_password=True))
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def start_servers(stack: ExitStack, args: argparse.Namespace) -> list[str]:
    """Start ``args.replicas`` servers on one fresh store (see the module docstring), one after
    the other (each migrates the schema at start-up; the migrator's lock makes that safe), with
    their logs in temporary files; they stop when ``stack`` closes. Returns their URLs."""
    env = {"METASENT_API_KEYS": args.api_key} if args.api_key else {}
    if args.database_url is not None:
        env["METASENT_DATABASE_URL"] = stack.enter_context(fresh_schema(args.database_url))
    else:
        env["METASENT_DATA_DIR"] = str(args.data_dir or tempfile.mkdtemp(prefix="metasent-load-"))
    urls = []
    for replica in range(args.replicas):
        log = Path(tempfile.mkstemp(prefix=f"metasent-load-{replica}-", suffix=".log")[1])
        logger.info("server %d log: %s", replica, log)
        url, _ = stack.enter_context(local_server(args.port + replica, args.checkpoint, args.threads, env, log))
        urls.append(url)
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url", action="append", help="a running server (repeat for replicas); omit to start `metasent serve`"
    )
    parser.add_argument("--port", type=int, default=8791, help="port of the first server this command starts")
    parser.add_argument("--replicas", type=int, default=1, help="servers this command starts, on one store")
    parser.add_argument(
        "--database-url", help="PostgreSQL database of the servers this command starts (a fresh schema in it)"
    )
    parser.add_argument("--checkpoint", help="checkpoint for the server this command starts")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each server this command starts")
    parser.add_argument(
        "--data-dir", type=Path, help="SQLite store of the servers this command starts (default: a new temporary dir)"
    )
    parser.add_argument("--api-key", default=os.environ.get("METASENT_API_KEY"), help="API key sent with every request")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--adapt-share", type=float, default=0.2, help="share of iterations that adapt")
    parser.add_argument("--texts", type=int, default=8, help="texts per classify request")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    parser.add_argument("--arsc", type=Path, default=Path("../shared/data/arsc"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/load/load.json"))
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.database_url is not None and args.data_dir is not None:
        parser.error("--database-url and --data-dir choose the store: give one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    pool = reviews(args.arsc, args.seed)
    if args.url is not None:
        result = asyncio.run(run_load(args.url, pool, args))
    else:
        with ExitStack() as stack:
            result = asyncio.run(run_load(start_servers(stack, args), pool, args))
        result["store"] = "postgresql" if args.database_url else "sqlite"
    result["command"] = "python -m bench.load " + " ".join(sys.argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
