"""Meta-testing: adapt on each episode's support set, score the query set.

Metrics are query accuracy and macro-F1 (ARSC's test sets are imbalanced: always answering
``positive`` scores 78.1% mean accuracy on its 12 test tasks, so macro-F1 is reported beside it).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sklearn.metrics import f1_score

from metasent.data.episodes import Episode, EpisodeSampler, fixed_episode
from metasent.data.registry import Task

from .adaptation import Predictor
from .config import InnerLoopConfig
from .model import MetaLearner


@dataclass
class EpisodeResult:
    """Scores of one adapted episode.

    Args:
        task (`str`): task name.
        seed (`int | None`): sampling seed (``None`` for fixed support/query files).
        accuracy (`float`): query accuracy in [0, 1].
        macro_f1 (`float`): query macro-F1 over the episode's labels, in [0, 1].
        num_query (`int`): query examples.
        adapt_seconds (`float`): inner-loop wall time, seconds.
        support_accuracy (`float`): accuracy on the support set after adaptation.
        positive_share (`float | None`): share of the query set labelled ``positive`` (the
            accuracy of always answering ``positive``), ``None`` without such a label.
    """

    task: str
    seed: int | None
    accuracy: float
    macro_f1: float
    num_query: int
    adapt_seconds: float
    support_accuracy: float
    positive_share: float | None = None


def evaluate_episode(
    model: MetaLearner,
    episode: Episode,
    inner_config: InnerLoopConfig,
    seed: int | None = None,
    batch_size: int = 32,
) -> EpisodeResult:
    """Adapt with the :class:`meta.adaptation.Predictor` on ``episode.support`` (class order
    ``episode.labels``) and score ``episode.query``."""
    predictor = Predictor(model, inner_config, batch_size)
    state = predictor.adapt([ex.text for ex in episode.support], [ex.label for ex in episode.support], episode.labels)
    predicted = predictor.predict(state, [ex.text for ex in episode.query])
    return score_episode(episode, predicted, seed, state.seconds, state.support_accuracy)


def score_episode(
    episode: Episode, predicted: Sequence[str], seed: int | None, adapt_seconds: float, support_accuracy: float
) -> EpisodeResult:
    """Score predicted labels of ``episode.query`` (in order) against their gold labels.

    Args:
        episode (`Episode`): the episode; its labels are the classes of the macro-F1.
        predicted (`Sequence[str]`): one predicted label per query example.
        seed (`int | None`): the episode's sampling seed.
        adapt_seconds (`float`): adaptation wall time, seconds.
        support_accuracy (`float`): accuracy on the support set after adaptation.

    Returns:
        `EpisodeResult`: accuracy and macro-F1 in [0, 1], and the always-``positive`` share.
    """
    gold = [ex.label for ex in episode.query]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    labels = list(episode.labels)
    return EpisodeResult(
        task=episode.task,
        seed=seed,
        accuracy=correct / max(len(gold), 1),
        macro_f1=float(f1_score(gold, list(predicted), labels=labels, average="macro", zero_division=0)),
        num_query=len(gold),
        adapt_seconds=adapt_seconds,
        support_accuracy=support_accuracy,
        positive_share=gold.count("positive") / len(gold) if gold and "positive" in labels else None,
    )


def evaluate_tasks(
    model: MetaLearner,
    tasks: Sequence[Task],
    inner_config: InnerLoopConfig,
    protocol: str = "fixed",
    support_split: str = "train",
    query_split: str = "test",
    k_shot: int = 5,
    seeds: int = 5,
    batch_size: int = 32,
) -> list[EpisodeResult]:
    """Meta-test on ``tasks``: the fixed ARSC episodes, or ``seeds`` sampled K-shot episodes per
    task (support from ``support_split``, every ``query_split`` example as the query set).

    Args:
        model (`MetaLearner`): the meta-learned (or pretrained) model.
        tasks (`Sequence[Task]`): tasks to evaluate.
        inner_config (`InnerLoopConfig`): the adaptation.
        protocol (`str`, defaults to ``"fixed"``): ``"fixed"`` (whole ``support_split`` as the
            support set) or ``"sampled"`` (K-shot episodes from seeds ``0..seeds-1``).
        support_split, query_split (`str`): splits of the support and query sets.
        k_shot (`int`, defaults to 5): support examples per class (sampled protocol).
        seeds (`int`, defaults to 5): episodes per task (sampled protocol).
        batch_size (`int`, defaults to 32): texts per forward pass.

    Returns:
        `list[EpisodeResult]`: one per episode.

    Raises:
        ValueError: for an unknown protocol.
        NotEnoughExamplesError: when a task cannot supply a K-shot support set.
    """
    if protocol not in ("fixed", "sampled"):
        raise ValueError(f"protocol must be 'fixed' or 'sampled', got {protocol!r}")
    results = []
    for task in tasks:
        if protocol == "fixed":
            episode = fixed_episode(task, support_split, query_split)
            results.append(evaluate_episode(model, episode, inner_config, None, batch_size))
            continue
        for seed in range(seeds):
            sampler = EpisodeSampler(
                [task], k_shot=k_shot, q_query=None, support_split=support_split, query_split=query_split, seed=seed
            )
            results.append(evaluate_episode(model, sampler.sample(task), inner_config, seed, batch_size))
    return results


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% confidence interval (Student t; 0 for fewer than 2 values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    from scipy.stats import t

    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 2) if known and len(known) == len(values) else None


def _always_positive(results: Sequence[EpisodeResult]) -> float | None:
    return _mean_or_none([None if r.positive_share is None else 100 * r.positive_share for r in results])


def summarize(results: Iterable[EpisodeResult]) -> dict[str, Any]:
    """Per-task and overall means of accuracy and macro-F1 (percent), with 95% CIs over episodes.

    Returns:
        `dict`: ``{"tasks": {task: {...}}, "mean": {...}, "episodes": [...]}``.
    """
    results = list(results)
    by_task: dict[str, list[EpisodeResult]] = defaultdict(list)
    for result in results:
        by_task[result.task].append(result)

    def block(rs: Sequence[EpisodeResult]) -> dict[str, Any]:
        acc, acc_ci = mean_ci95([100 * r.accuracy for r in rs])
        f1, f1_ci = mean_ci95([100 * r.macro_f1 for r in rs])
        return {
            "accuracy": round(acc, 2),
            "accuracy_ci95": round(acc_ci, 2),
            "macro_f1": round(f1, 2),
            "macro_f1_ci95": round(f1_ci, 2),
            "episodes": len(rs),
            "adapt_seconds": round(statistics.median(r.adapt_seconds for r in rs), 3),
            "always_positive_accuracy": _always_positive(rs),
        }

    tasks = {task: block(rs) for task, rs in sorted(by_task.items())}
    # The mean weighs every task equally (the ARSC metric). Its CI is taken over all sampled
    # episodes when tasks were sampled several times, else over the task means.
    sampled = any(len(rs) > 1 for rs in by_task.values())
    acc, acc_ci = mean_ci95([t["accuracy"] for t in tasks.values()])
    f1, f1_ci = mean_ci95([t["macro_f1"] for t in tasks.values()])
    if sampled:
        everything = block(results)
        acc_ci, f1_ci = everything["accuracy_ci95"], everything["macro_f1_ci95"]
    overall = {
        "accuracy": round(acc, 2),
        "accuracy_ci95": round(acc_ci, 2),
        "macro_f1": round(f1, 2),
        "macro_f1_ci95": round(f1_ci, 2),
        "tasks": len(tasks),
        "episodes": len(results),
        "adapt_seconds": round(statistics.median(r.adapt_seconds for r in results), 3),
        "always_positive_accuracy": _mean_or_none([t["always_positive_accuracy"] for t in tasks.values()]),
    }
    return {"tasks": tasks, "mean": overall, "episodes": [asdict(r) for r in results]}


def format_table(summary: dict[str, Any], title: str = "") -> str:
    """A plain-text table of :func:`summarize`'s output (percent, ± 95% CI where sampled)."""

    def cell(row: dict[str, Any], key: str) -> str:
        ci = row.get(f"{key}_ci95", 0.0)
        return f"{row[key]:6.2f} ± {ci:5.2f}" if ci else f"{row[key]:6.2f}"

    lines = [title] if title else []

    def positive(row: dict[str, Any]) -> str:
        value = row.get("always_positive_accuracy")
        return "" if value is None else f"{value:.2f}"

    header = f"{'task':28s} {'accuracy':>16s} {'macro-F1':>16s} {'episodes':>8s} {'adapt s':>8s} {'always-pos':>10s}"
    lines.append(header)
    for task, row in summary["tasks"].items():
        lines.append(
            f"{task:28s} {cell(row, 'accuracy'):>16s} {cell(row, 'macro_f1'):>16s} "
            f"{row['episodes']:8d} {row['adapt_seconds']:8.3f} {positive(row):>10s}"
        )
    mean = summary["mean"]
    lines.append(
        f"{'MEAN (' + str(mean['tasks']) + ' tasks)':28s} {cell(mean, 'accuracy'):>16s} "
        f"{cell(mean, 'macro_f1'):>16s} {mean['episodes']:8d} {mean['adapt_seconds']:8.3f} {positive(mean):>10s}"
    )
    return "\n".join(lines)
