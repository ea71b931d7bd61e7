"""Load test: concurrent clients mixing adaptations and classifications against a metasent server
on the loopback interface for a fixed duration.

    python -m bench.load --threads 1                    # starts `metasent serve` itself (MiniLM)
    python -m bench.load --url http://127.0.0.1:8000    # or targets a running server

Each client loops until ``--duration`` ends: with probability ``--adapt-share`` it adapts a new
domain on 10 gourmet food reviews (5 per label, resampled each time) and deletes it again (so the
store stays bounded); otherwise it classifies ``--texts`` reviews with the shared domain. A 429
(the adaptation queue is full) is deliberate back-pressure: the client waits its ``Retry-After``
(at most 5 s) and goes on. Prints and writes (``--output``) request counts, status counts and
p50/p99 latency per operation; exits 1 on any other error (unexpected status, timeout, connection
error). Reviews come from ARSC (``--arsc``) or, without it, from a small built-in set.

The server this command starts keeps its domains in a fresh SQLite store (``--data-dir``, default
a new temporary directory), so a run never sees an earlier run's domains. With ``--api-key`` (or
``METASENT_API_KEY``) every request sends that key, and a server this command starts accepts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
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

    def record(self, operation: str, seconds: float, status: int | str) -> None:
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
    try:
        response = await client.request(method, path, **kw)
    except httpx.HTTPError as error:
        stats.record(operation, time.perf_counter() - start, type(error).__name__)
        return None
    stats.record(operation, time.perf_counter() - start, response.status_code)
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


async def run_load(url: str, pool: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    limits = httpx.Limits(max_connections=args.clients + 4)
    api_key = getattr(args, "api_key", None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=headers) as client:
        health = (await client.get("/healthz")).json()
        body = {"name": "shared", "examples": support_set(pool, random.Random(0))}
        shared = await client.post("/v1/domains", json=body)
        shared.raise_for_status()
        domain_id = shared.json()["domain_id"]
        start = time.monotonic()
        deadline = start + args.duration
        await asyncio.gather(
            *[
                worker(client, stats, pool, domain_id, deadline, args.adapt_share, args.texts, args.seed + i)
                for i in range(args.clients)
            ]
        )
        elapsed = time.monotonic() - start
        await client.delete(f"/v1/domains/{domain_id}")
        metrics = (await client.get("/metrics")).text
    return summarize(stats, elapsed, health, metrics, args)


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def summarize(stats: Stats, elapsed: float, health: dict, metrics: str, args: argparse.Namespace) -> dict[str, Any]:
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
    adapt_count = _metric(metrics, "metasent_adaptation_seconds_count")
    adapt_sum = _metric(metrics, "metasent_adaptation_seconds_sum")
    return {
        "server": {k: health.get(k) for k in ("algorithm", "encoder", "checkpoint", "device")},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; omit to start `metasent serve` on --port")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--checkpoint", help="checkpoint for the server this command starts")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server this command starts")
    parser.add_argument(
        "--data-dir", type=Path, help="domain store of the server this command starts (default: a new temporary dir)"
    )
    parser.add_argument("--api-key", default=os.environ.get("METASENT_API_KEY"), help="API key sent with every request")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--adapt-share", type=float, default=0.2, help="share of iterations that adapt")
    parser.add_argument("--texts", type=int, default=8, help="texts per classify request")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    parser.add_argument("--arsc", type=Path, default=Path("../shared/data/arsc"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/load.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    pool = reviews(args.arsc, args.seed)
    if args.url is not None:
        result = asyncio.run(run_load(args.url, pool, args))
    else:
        env = {"METASENT_API_KEYS": args.api_key} if args.api_key else {}
        if args.data_dir is not None:
            env["METASENT_DATA_DIR"] = str(args.data_dir)
        log = Path(tempfile.mkstemp(prefix="metasent-load-", suffix=".log")[1])
        logger.info("server log: %s", log)
        with local_server(args.port, args.checkpoint, args.threads, env, log) as (url, _):
            result = asyncio.run(run_load(url, pool, args))
    result["command"] = "python -m bench.load " + " ".join(sys.argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
