"""Speed and memory benchmarks, each figure printed with its ratio to a reference measured in
the same run on the same texts (`metasent speed`).

1. adaptation seconds for a 5-shot binary support set (median of ``repeats``) and the ratio to
   one plain forward pass of the full encoder over those 10 texts;
2. classification texts/s through the service's code path (:class:`meta.adaptation.Predictor`,
   in process), against a bare length-sorted encoder forward and a file-order forward padded to a
   fixed length, over the same texts;
3. HTTP throughput with concurrent clients against a `metasent serve` subprocess (requests/s,
   p50/p99 latency, texts/s) and its ratio to (2);
4. meta-training episodes/s with and without the frozen-layer cache in the inner loop, and the
   episodes that fit in 40 minutes;
5. peak resident memory of the server with ``domains`` adapted domains and bytes per domain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.server import local_server
from metasent.data.episodes import EpisodeSampler
from metasent.data.readers import read_arsc
from metasent.meta.adaptation import AdaptedState, Predictor
from metasent.meta.config import CheckpointConfig
from metasent.meta.feature_cache import LowerLayerCache
from metasent.meta.model import MetaLearner

logger = logging.getLogger(__name__)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def food_support(arsc: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """5 positive + 5 negative gourmet_food.t2 training reviews."""
    (task,) = [t for t in read_arsc(arsc, include=["gourmet_food"]) if t.name == "gourmet_food.t2"]
    episode = EpisodeSampler([task], k_shot=5, q_query=1, seed=seed).sample(task)
    return [e.text for e in episode.support], [e.label for e in episode.support]


def review_texts(arsc: Path, count: int) -> list[str]:
    """The first ``count`` reviews of the ARSC test domains' query files, in file order."""
    texts: list[str] = []
    for task in read_arsc(arsc, include=["books", "dvd", "electronics", "kitchen_housewares"]):
        texts.extend(e.text for e in task.split("test"))
        if len(texts) >= count:
            break
    return texts[:count]


def bench_adaptation(model: MetaLearner, config: CheckpointConfig, texts: list[str], labels: list[str], repeats: int):
    predictor = Predictor(model, config.inner_loop)
    adapt = _median_seconds(lambda: predictor.adapt(texts, labels), repeats)
    batch = model.tokenize(texts)
    with torch.inference_mode():
        forward = _median_seconds(lambda: model(**batch), repeats)
    return {
        "adapt_seconds_median": round(adapt, 6),
        "forward_seconds_median": round(forward, 6),
        "ratio_to_forward": round(adapt / forward, 2),
        "repeats": repeats,
    }


def _bare_sorted_forward(model: MetaLearner, texts: Sequence[str], batch_size: int) -> None:
    ids = model.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            model.encoder(**model.collate([ids[i] for i in order[start : start + batch_size]]))


def _file_order_padded_forward(model: MetaLearner, texts: Sequence[str], batch_size: int, length: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = model.tokenizer(
                [model.encoder_config.text_prefix + text for text in texts[start : start + batch_size]],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
            model.encoder(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            )


def bench_classification(
    model: MetaLearner,
    config: CheckpointConfig,
    state: AdaptedState,
    texts: list[str],
    batch_size: int,
    padded_length: int,
):
    padded_length = min(padded_length, int(model.encoder.config.max_position_embeddings))
    predictor = Predictor(model, config.inner_loop, batch_size)
    predictor.predict_many([(state, texts[:batch_size])])  # warm-up
    timings = {}
    for name, run in (
        ("service", lambda: predictor.predict_many([(state, texts)])),
        ("bare_sorted", lambda: _bare_sorted_forward(model, texts, batch_size)),
        ("file_order_padded", lambda: _file_order_padded_forward(model, texts, batch_size, padded_length)),
    ):
        start = time.perf_counter()
        run()
        timings[name] = len(texts) / (time.perf_counter() - start)
    return {
        "texts": len(texts),
        "batch_size": batch_size,
        "max_length": model.max_length(),
        "padded_length": padded_length,
        "service_texts_per_s": round(timings["service"], 1),
        "bare_sorted_texts_per_s": round(timings["bare_sorted"], 1),
        "file_order_padded_texts_per_s": round(timings["file_order_padded"], 1),
        "ratio_to_bare_sorted": round(timings["service"] / timings["bare_sorted"], 3),
        "ratio_to_file_order_padded": round(timings["service"] / timings["file_order_padded"], 2),
    }


def bench_meta_training(model: MetaLearner, config: CheckpointConfig, arsc: Path, outer_steps: int):
    from metasent.meta.algorithms.fomaml import fomaml_step

    held_out = ["books", "dvd", "electronics", "kitchen_housewares", "gourmet_food", "grocery", "music", "video"]
    tasks = [t for t in read_arsc(arsc, exclude=held_out) if t.splits.get("train")]
    train = config.training
    k_shot, q_query, meta_batch = (train.k_shot, train.q_query, train.meta_batch_size) if train else (5, 8, 4)
    sampler = EpisodeSampler(tasks, k_shot=k_shot, q_query=q_query, seed=0)
    sampler.tasks = [
        t for t in tasks if min(sum(e.label == lab for e in t.split("train")) for lab in t.labels) >= k_shot + q_query
    ]
    batches = [[sampler.sample() for _ in range(meta_batch)] for _ in range(outer_steps + 1)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the step, leave the weights as they are
    rates = {}
    for name, cache in (("uncached_inner_loop", False), ("cached_inner_loop", True)):
        fomaml_step(model, batches[0], config.inner_loop, optimizer, 1.0, cache)  # warm-up
        start = time.perf_counter()
        for batch in batches[1:]:
            fomaml_step(model, batch, config.inner_loop, optimizer, 1.0, cache)
        rates[name] = outer_steps * meta_batch / (time.perf_counter() - start)
    # Frozen lower layers (TrainConfig.frozen_layers): first pass fills the per-text cache, the
    # second pass over the same episodes reads it, as later episodes of a long run mostly do.
    frozen = train.frozen_layers if train and train.frozen_layers else max(1, model.num_layers - 2)
    feature_cache = LowerLayerCache(model, frozen)
    for name in ("frozen_lower_cold_cache", "frozen_lower_warm_cache"):
        start = time.perf_counter()
        for batch in batches[1:]:
            fomaml_step(model, batch, config.inner_loop, optimizer, 1.0, True, feature_cache)
        rates[name] = outer_steps * meta_batch / (time.perf_counter() - start)
    # One pass of the layers below the adapted ones for the whole meta-batch, or one per episode
    # (fomaml_step's batched=None picks the meta-batch pass on CUDA only).
    passes = {}
    if 0 < config.inner_loop.adapted_layers < model.num_layers:
        for name, batched in (("per_episode_passes", False), ("one_meta_batch_pass", True)):
            fomaml_step(model, batches[0], config.inner_loop, optimizer, 1.0, True, None, batched)  # warm-up
            start = time.perf_counter()
            for batch in batches[1:]:
                fomaml_step(model, batch, config.inner_loop, optimizer, 1.0, True, None, batched)
            passes[name] = round(outer_steps / (time.perf_counter() - start), 4)
        passes["ratio_meta_batch_to_per_episode"] = round(
            passes["one_meta_batch_pass"] / passes["per_episode_passes"], 2
        )
    optimizer.zero_grad(set_to_none=True)
    return {
        "meta_batch_size": meta_batch,
        "outer_steps_per_s": passes,
        "episodes_timed": outer_steps * meta_batch,
        "before_episodes_per_s": round(rates["uncached_inner_loop"], 3),
        "after_episodes_per_s": round(rates["cached_inner_loop"], 3),
        "speedup": round(rates["cached_inner_loop"] / rates["uncached_inner_loop"], 2),
        "episodes_in_40_min": int(rates["cached_inner_loop"] * 2400),
        "frozen_lower_layers": frozen,
        "frozen_lower_cold_cache_episodes_per_s": round(rates["frozen_lower_cold_cache"], 3),
        "frozen_lower_warm_cache_episodes_per_s": round(rates["frozen_lower_warm_cache"], 3),
        "frozen_lower_warm_speedup": round(rates["frozen_lower_warm_cache"] / rates["uncached_inner_loop"], 2),
    }


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


async def _http_load(url: str, domain_id: str, texts: list[str], clients: int, requests: int, per_request: int):
    import httpx

    latencies: list[float] = []
    rng = random.Random(0)
    bodies = [{"texts": rng.sample(texts, per_request)} for _ in range(clients * requests)]

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for body in bodies[index::clients]:
            start = time.perf_counter()
            response = await http.post(f"/v1/domains/{domain_id}/classify", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "texts_per_request": per_request,
        "requests_per_s": round(len(latencies) / wall, 2),
        "texts_per_s": round(len(latencies) * per_request / wall, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def bench_server(
    checkpoint: Path | None,
    support: tuple[list[str], list[str]],
    texts: list[str],
    port: int,
    clients: int,
    requests: int,
    per_request: int,
    domains: int,
    threads: int | None,
):
    import httpx

    env = {"METASENT_LOG_LEVEL": "WARNING", "METASENT_MAX_DOMAINS_PER_TENANT": str(domains + 10)}
    with local_server(port, checkpoint, threads, env) as (url, process):  # a fresh domain store per run
        examples = [{"text": t, "label": lab} for t, lab in zip(*support, strict=True)]
        created = httpx.post(f"{url}/v1/domains", json={"name": "bench", "examples": examples}, timeout=600).json()
        http = asyncio.run(_http_load(url, created["domain_id"], texts, clients, requests, per_request))
        rss_one = _rss_kib(process.pid, "VmRSS")
        with httpx.Client(base_url=url, timeout=600) as client:
            for i in range(domains - 1):
                client.post("/v1/domains", json={"name": f"bench-{i}", "examples": examples}).raise_for_status()
        rss_all = _rss_kib(process.pid, "VmRSS")
        peak = _rss_kib(process.pid, "VmHWM")
    memory = {
        "domains": domains,
        "peak_rss_mib": round(peak / 1024, 1),
        "rss_with_1_domain_mib": round(rss_one / 1024, 1),
        "rss_with_all_domains_mib": round(rss_all / 1024, 1),
        "rss_bytes_per_domain": int((rss_all - rss_one) * 1024 / max(domains - 1, 1)),
    }
    return http, memory


def run_bench(
    arsc: Path,
    checkpoint: Path | None,
    device: str,
    repeats: int = 10,
    texts: int = 1000,
    batch_size: int = 32,
    padded_length: int = 256,
    train_steps: int = 3,
    http: bool = True,
    clients: int = 8,
    requests: int = 10,
    per_request: int = 8,
    domains: int = 100,
    port: int = 8790,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every benchmark; returns the figures (see the module docstring)."""
    from metasent.meta.checkpoint import load_model
    from metasent.meta.model import resolve_device

    model, config = load_model(checkpoint, None, resolve_device(device))
    support = food_support(arsc)
    corpus = review_texts(arsc, texts)
    state = Predictor(model, config.inner_loop).adapt(*support)
    result: dict[str, Any] = {
        "machine": {
            "device": str(model.device),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if model.device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "model": {
            "checkpoint": str(checkpoint) if checkpoint else None,
            "encoder": config.encoder.name_or_path,
            "inner_loop": config.inner_loop.model_dump(),
            "bytes_per_domain_tensors": sum(t.numel() * t.element_size() for t in state.to_tensors().values()),
        },
    }
    logger.info("1/5 adaptation")
    result["adaptation"] = bench_adaptation(model, config, *support, repeats)
    logger.info("2/5 classification")
    result["classification"] = bench_classification(model, config, state, corpus, batch_size, padded_length)
    logger.info("4/5 meta-training")
    result["meta_training"] = bench_meta_training(model, config, arsc, train_steps)
    if http:
        logger.info("3/5 and 5/5 HTTP and memory")
        del model
        result["http"], result["memory"] = bench_server(
            checkpoint, support, corpus, port, clients, requests, per_request, domains, threads
        )
        result["http"]["ratio_to_service"] = round(
            result["http"]["texts_per_s"] / result["classification"]["service_texts_per_s"], 3
        )
    return result
