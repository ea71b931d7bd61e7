"""Measure, on dev tasks, how far query accuracy strays from the held-out accuracy estimate made
at adaptation, and record that task-level spread with the model so that the estimate's 95%
interval accounts for it (:func:`meta.adaptation.estimate_interval`).

For each sampled K-shot dev episode ``i`` the residual is ``r_i = query accuracy - estimate``.
Part of its variance is the binomial noise of the estimate's ``n_i`` held-out predictions
(``p_i (1 - p_i) / n_i``) and of the ``q_i`` query examples; the rest is the spread between tasks:

    task_sd^2 = max(0, mean(r_i^2) - mean(p_i (1 - p_i) / n_i) - mean(a_i (1 - a_i) / q_i))

(the mean squared residual, so a systematic bias widens the interval too). Run it on dev tasks
only (music and video: no method trains on their ``.dev`` files); the test and food tasks then
check the coverage in ``metasent benchmark``.

    python -m bench.calibrate_estimate --checkpoint metasent/models/default --data ../shared/data/arsc \\
        --domains music,video --seeds 5 --output results/default_model/estimate_calibration.json --write
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from metasent.meta.adaptation import Predictor
from metasent.meta.evaluate import EmbeddingCache, EpisodeResult, evaluate_episode

logger = logging.getLogger(__name__)


def task_spread(results: list[EpisodeResult]) -> float:
    """``task_sd`` (a fraction) from episodes that carry an estimate (see the module docstring).

    Raises:
        ValueError: when no episode has an estimate.
    """
    rows = [r for r in results if r.estimated_accuracy is not None and r.estimate_n]
    if not rows:
        raise ValueError("no episode has an accuracy estimate")
    squared = statistics.fmean((r.accuracy - r.estimated_accuracy) ** 2 for r in rows)  # type: ignore[operator]
    estimate_noise = statistics.fmean(
        r.estimated_accuracy * (1 - r.estimated_accuracy) / r.estimate_n  # type: ignore[operator]
        for r in rows
    )
    query_noise = statistics.fmean(r.accuracy * (1 - r.accuracy) / max(r.num_query, 1) for r in rows)
    return math.sqrt(max(0.0, squared - estimate_noise - query_noise))


def calibrate(
    checkpoint: Path, data: Path, domains: list[str], seeds: int = 5, k_shot: int = 5, max_query: int = 200
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` with estimates on sampled dev episodes of ``domains`` and return
    ``{"task_sd", "episodes", "estimate_mae", "wilson_coverage", ...}``."""
    from bench.benchmark import _sampled, _tasks
    from metasent.meta.checkpoint import load_checkpoint
    from metasent.meta.evaluate import estimate_quality

    model, config = load_checkpoint(checkpoint, "cpu")
    inner = config.inner_loop.model_copy(update={"estimate_task_sd": None})  # the plain Wilson interval
    tasks = list(_tasks(data).select(include=domains).select(require_split="dev"))
    pairs = _sampled(tasks, k_shot, seeds, "dev", "dev", max_query=max_query)
    cache = EmbeddingCache(Predictor(model, inner, 64))
    results = [evaluate_episode(model, episode, inner, seed, 64, True, cache) for episode, seed in pairs]
    spread = task_spread(results)
    quality = estimate_quality(results)
    return {
        "task_sd": round(spread, 4),
        "episodes": len(results),
        "tasks": len(tasks),
        "domains": domains,
        "k_shot": k_shot,
        "seeds": seeds,
        "max_query": max_query,
        "estimate_mae": quality["estimate_mae"],
        "wilson_coverage": quality["estimate_coverage"],
        "residuals": [round(r.accuracy - (r.estimated_accuracy or 0.0), 4) for r in results],
    }


def write_task_sd(checkpoint: Path, task_sd: float) -> None:
    """Record ``task_sd`` as the checkpoint's ``inner_loop.estimate_task_sd`` (its metasent.json:
    the model's hash changes, so domains adapted before are re-adapted with the new interval)."""
    from metasent.meta.checkpoint import CONFIG_FILE
    from metasent.meta.config import CheckpointConfig

    path = Path(checkpoint) / CONFIG_FILE
    config = CheckpointConfig.model_validate_json(path.read_text())
    config.inner_loop.estimate_task_sd = task_sd
    path.write_text(config.model_dump_json(indent=2) + "\n")


def main(
    checkpoint: Path,
    data: Path = Path("../shared/data/arsc"),
    domains: str = "music,video",
    seeds: int = 5,
    output: Path | None = None,
    write: bool = False,
    threads: int | None = None,
) -> None:
    """Measure the estimate's task-level spread on dev tasks; ``--write`` records it in the checkpoint."""
    import torch
    import typer

    logging.basicConfig(level="INFO")
    if threads:
        torch.set_num_threads(threads)
    result = calibrate(checkpoint, data, [d.strip() for d in domains.split(",") if d.strip()], seeds)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    if write:
        write_task_sd(checkpoint, result["task_sd"])
    typer.echo(
        f"task_sd {result['task_sd']:.4f} over {result['episodes']} dev episodes; estimate MAE "
        f"{result['estimate_mae']:.2f} points, Wilson interval coverage {result['wilson_coverage']:.1f}%"
    )


if __name__ == "__main__":
    import typer

    typer.run(main)
