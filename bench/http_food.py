"""Adapt a running metasent server to gourmet food from 10 labelled reviews and classify 200
held-out reviews over HTTP.

    python -m bench.http_food --checkpoint runs/arsc/best      # starts `metasent serve` itself
    python -m bench.http_food --url http://127.0.0.1:8000     # or uses a running server

Support: 5 positive + 5 negative reviews sampled (seed) from ``gourmet_food.t2.train``. Query:
200 other gourmet_food.t2 reviews: all of ``.test`` (55) and ``.dev`` (60), then ``.train``
reviews not in the support set (ARSC has only 55 test reviews per food task). Prints accuracy,
macro-F1, the server's adaptation seconds and classification texts per second (median of
``--repeats`` requests of all 200 texts).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

import httpx
from sklearn.metrics import f1_score

from bench.server import local_server
from metasent.data.readers import read_arsc

logger = logging.getLogger("bench.http_food")


def food_episode(arsc: Path, seed: int, n_query: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    (task,) = [t for t in read_arsc(arsc, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    rng = random.Random(seed)
    train = list(task.split("train"))
    rng.shuffle(train)
    support = [e for e in train if e.label == "positive"][:5] + [e for e in train if e.label == "negative"][:5]
    rest = [e for e in train if e not in support]
    query = (list(task.split("test")) + list(task.split("dev")) + rest)[:n_query]
    as_dicts = lambda examples: [{"text": e.text, "label": e.label} for e in examples]  # noqa: E731
    return as_dicts(support), as_dicts(query)


def run(url: str, arsc: Path, seed: int, n_query: int, repeats: int) -> dict[str, object]:
    support, query = food_episode(arsc, seed, n_query)
    with httpx.Client(base_url=url, timeout=600) as client:
        health = client.get("/healthz").json()
        start = time.perf_counter()
        created = client.post("/v1/domains", json={"name": "gourmet food", "examples": support})
        post_seconds = time.perf_counter() - start
        created.raise_for_status()
        domain = created.json()
        texts = [q["text"] for q in query]
        rates, predictions = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            response = client.post(f"/v1/domains/{domain['domain_id']}/classify", json={"texts": texts})
            rates.append(len(texts) / (time.perf_counter() - start))
            response.raise_for_status()
            predictions = [p["label"] for p in response.json()["predictions"]]
        client.delete(f"/v1/domains/{domain['domain_id']}")
    gold = [q["label"] for q in query]
    correct = sum(p == g for p, g in zip(predictions, gold, strict=True))
    return {
        "server": {k: health.get(k) for k in ("model", "algorithm", "encoder", "checkpoint_hash", "device")},
        "support": len(support),
        "query": len(query),
        "query_positive_share": round(gold.count("positive") / len(gold), 3),
        "accuracy": round(100 * correct / len(gold), 2),
        "macro_f1": round(100 * float(f1_score(gold, predictions, average="macro")), 2),
        "adaptation_seconds_server": domain["adaptation"]["seconds"],
        "adapt_request_seconds": round(post_seconds, 3),
        "texts_per_second_median": round(statistics.median(rates), 1),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; omit to start `metasent serve`")
    parser.add_argument("--checkpoint", help="checkpoint for the server this command starts")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--arsc", type=Path, default=Path("../shared/data/arsc"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-query", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.url is not None:
        result = run(args.url, args.arsc, args.seed, args.n_query, args.repeats)
    else:
        with local_server(args.port, args.checkpoint) as (url, _):
            result = run(url, args.arsc, args.seed, args.n_query, args.repeats)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
