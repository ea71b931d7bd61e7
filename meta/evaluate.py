"""Meta-testing: adapt on each episode's support set, score the query set.

Metrics are query accuracy and macro-F1 (ARSC's test sets are imbalanced: always answering
``positive`` scores 78.1% mean accuracy on its 12 test tasks, so macro-F1 is reported beside it),
the expected calibration error of the scores, and how far the held-out accuracy estimate made at
adaptation (:func:`meta.estimate.estimate_accuracy`) is from the query accuracy.
:func:`evaluate_active` measures what labelling suggested texts (:mod:`meta.active`) buys over
labelling random ones.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import f1_score
from torch import Tensor

from metasent.data.episodes import Episode, EpisodeSampler, fixed_episode
from metasent.data.readers import Example, arsc_target_domains, read_tasks
from metasent.data.registry import Task

from .active import suggest
from .adaptation import AccuracyEstimate, AdaptedState, Predictor
from .checkpoint import load_model
from .config import InnerLoopConfig
from .model import MetaLearner, resolve_device
from .resolve import ArgumentError, resolve_inner_loop


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
        ece (`float | None`): expected calibration error of the query predictions' top-label
            scores, in [0, 1] (:func:`expected_calibration_error`); ``None`` without scores.
        estimated_accuracy, estimate_low, estimate_high (`float | None`): the held-out estimate
            made at adaptation and its 95% interval, in [0, 1]; ``None`` when not estimated.
        estimate_seconds (`float | None`): wall time of the estimate, seconds.
        estimate_n (`int | None`): held-out predictions behind the estimate.
    """

    task: str
    seed: int | None
    accuracy: float
    macro_f1: float
    num_query: int
    adapt_seconds: float
    support_accuracy: float
    positive_share: float | None = None
    ece: float | None = None
    estimated_accuracy: float | None = None
    estimate_low: float | None = None
    estimate_high: float | None = None
    estimate_seconds: float | None = None
    estimate_n: int | None = None


class EmbeddingCache:
    """Base-encoder embeddings by text, kept across the episodes of one evaluation.

    An adaptation that takes no inner step leaves the encoder as it is
    (:attr:`AdaptedState.shares_encoder`), so every episode over the same texts (the seeds of a
    task, the t2/t4/t5 tasks of one domain) needs each text encoded once. Valid for one model's
    meta-parameters only: make a new cache when they change.

    Args:
        predictor (`Predictor`): encodes the texts not seen yet.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._rows: dict[str, Tensor] = {}

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Base-encoder embeddings (texts, hidden) on the CPU, in input order; each text not seen
        before is encoded once."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._rows]
        if missing:
            self._rows.update(zip(missing, self.predictor.embed(missing), strict=True))
        if not texts:
            return torch.empty(0, int(self.predictor.model.encoder.config.hidden_size))
        return torch.stack([self._rows[t] for t in texts])

    def predict_proba(self, state: AdaptedState, texts: Sequence[str]) -> Tensor:
        """Class probabilities (texts, N) under ``state``, which must share the encoder, from the
        cached embeddings: the same as :meth:`Predictor.predict_proba` up to float rounding.

        Raises:
            ValueError: when ``state`` adapted the encoder (its embeddings differ from the cache's).
        """
        if not state.shares_encoder:
            raise ValueError("an adapted encoder cannot use base-encoder embeddings; predict without the cache")
        z = self.embed(texts).to(self.predictor.model.device)  # (texts, hidden)
        with torch.inference_mode():
            return self.predictor.probabilities(state, z).cpu()


def evaluate_episode(
    model: MetaLearner,
    episode: Episode,
    inner_config: InnerLoopConfig,
    seed: int | None = None,
    batch_size: int = 32,
    estimate: bool = False,
    cache: EmbeddingCache | None = None,
) -> EpisodeResult:
    """Adapt with the :class:`meta.adaptation.Predictor` on ``episode.support`` (class order
    ``episode.labels``) and score ``episode.query``; with ``estimate``, also the held-out accuracy
    estimate made at adaptation (as the server makes it). With a ``cache`` (of this ``model``),
    an adaptation that leaves the encoder as it is scores the query set from cached embeddings."""
    predictor = Predictor(model, inner_config, batch_size)
    texts, labels = [ex.text for ex in episode.support], [ex.label for ex in episode.support]
    state = predictor.adapt(texts, labels, episode.labels, estimate=estimate)
    query = [ex.text for ex in episode.query]
    if cache is not None and state.shares_encoder:
        probs = cache.predict_proba(state, query)  # (query, N)
    else:
        probs = predictor.predict_proba(state, query)  # (query, N)
    predicted = [state.labels[i] for i in probs.argmax(-1).tolist()]
    return score_episode(episode, predicted, seed, state.seconds, state.support_accuracy, probs, state.estimate)


def expected_calibration_error(probs: Tensor, gold: Tensor, bins: int = 10) -> float:
    """Expected calibration error of the top-label scores (Guo et al. 2017, "On Calibration of
    Modern Neural Networks"; Naeini et al. 2015): the predictions are put in ``bins`` equal-width
    bins of confidence ``max p`` and ``ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|``.

    Args:
        probs (`Tensor`): (examples, N) class probabilities.
        gold (`Tensor`): (examples,) gold class ids.
        bins (`int`, defaults to 10): confidence bins over [0, 1].

    Returns:
        `float`: in [0, 1]; 0 for no examples.
    """
    if probs.shape[0] == 0:
        return 0.0
    confidence, predicted = probs.float().max(-1)  # (examples,), (examples,)
    correct = (predicted == gold).float()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)  # (examples,), bin of each; 1.0 in the last
    total = 0.0
    for b in range(bins):
        members = which == b
        if bool(members.any()):
            gap = correct[members].mean() - confidence[members].mean()
            total += float(members.float().mean() * gap.abs())
    return total


def score_episode(
    episode: Episode,
    predicted: Sequence[str],
    seed: int | None,
    adapt_seconds: float,
    support_accuracy: float,
    probs: Tensor | None = None,
    estimate: AccuracyEstimate | None = None,
) -> EpisodeResult:
    """Score predicted labels of ``episode.query`` (in order) against their gold labels.

    Args:
        episode (`Episode`): the episode; its labels are the classes of the macro-F1.
        predicted (`Sequence[str]`): one predicted label per query example.
        seed (`int | None`): the episode's sampling seed.
        adapt_seconds (`float`): adaptation wall time, seconds.
        support_accuracy (`float`): accuracy on the support set after adaptation.
        probs (`Tensor`, *optional*): (query, N) the scores behind ``predicted``, columns in
            ``episode.labels`` order, for the calibration error.
        estimate (`AccuracyEstimate`, *optional*): the estimate made at adaptation.

    Returns:
        `EpisodeResult`: accuracy and macro-F1 in [0, 1], the always-``positive`` share, the
        calibration error and the estimate.
    """
    gold = [ex.label for ex in episode.query]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    labels = list(episode.labels)
    ece = None
    if probs is not None:
        gold_ids = torch.tensor([labels.index(g) for g in gold], dtype=torch.long)
        ece = expected_calibration_error(probs, gold_ids)
    return EpisodeResult(
        task=episode.task,
        seed=seed,
        accuracy=correct / max(len(gold), 1),
        macro_f1=float(f1_score(gold, list(predicted), labels=labels, average="macro", zero_division=0)),
        num_query=len(gold),
        adapt_seconds=adapt_seconds,
        support_accuracy=support_accuracy,
        positive_share=gold.count("positive") / len(gold) if gold and "positive" in labels else None,
        ece=ece,
        estimated_accuracy=None if estimate is None else estimate.accuracy,
        estimate_low=None if estimate is None else estimate.low,
        estimate_high=None if estimate is None else estimate.high,
        estimate_seconds=None if estimate is None else estimate.seconds,
        estimate_n=None if estimate is None else estimate.n,
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
    estimate: bool = False,
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
        estimate (`bool`, defaults to False): also make the held-out accuracy estimate.

    Returns:
        `list[EpisodeResult]`: one per episode.

    Raises:
        ValueError: for an unknown protocol.
        NotEnoughExamplesError: when a task cannot supply a K-shot support set.
    """
    if protocol not in ("fixed", "sampled"):
        raise ValueError(f"protocol must be 'fixed' or 'sampled', got {protocol!r}")
    results = []
    cache = EmbeddingCache(Predictor(model, inner_config, batch_size))
    for task in tasks:
        if protocol == "fixed":
            episode = fixed_episode(task, support_split, query_split)
            results.append(evaluate_episode(model, episode, inner_config, None, batch_size, estimate, cache))
            continue
        for seed in range(seeds):
            sampler = EpisodeSampler(
                [task], k_shot=k_shot, q_query=None, support_split=support_split, query_split=query_split, seed=seed
            )
            episode = sampler.sample(task)
            results.append(evaluate_episode(model, episode, inner_config, seed, batch_size, estimate, cache))
    return results


def evaluate_checkpoint(
    data: str,
    checkpoint: Path | None = None,
    *,
    encoder: str | None = None,
    algorithm: str = "none",
    domains: list[str] | None = None,
    protocol: str = "fixed",
    support_split: str = "train",
    query_split: str = "test",
    k_shot: int = 5,
    seeds: int = 5,
    inner_loop: dict[str, Any] | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    estimate: bool = False,
) -> tuple[dict[str, Any], str]:
    """``metasent evaluate``: load a checkpoint (or the un-meta-trained ``encoder`` with
    ``algorithm``'s inner loop), adapt on each task's support set and score its query set
    (:func:`evaluate_tasks`), then :func:`summarize` with the run's settings under ``config``.

    Args:
        data (`str`): an ARSC directory, or a JSONL/CSV/HF dataset.
        checkpoint (`Path`, *optional*): a checkpoint directory; ``None`` for the baseline.
        encoder (`str`, *optional*): the baseline's encoder (default all-MiniLM-L6-v2).
        algorithm (`str`, defaults to ``"none"``): the baseline's algorithm (not meta-trained).
        domains (`list[str]`, *optional*): domains to evaluate (default: ARSC's 4 target domains
            when ``data`` lists them, else every domain).
        protocol, support_split, query_split, k_shot, seeds, batch_size, estimate: as
            :func:`evaluate_tasks`.
        inner_loop (`dict`, *optional*): inner-loop fields overriding the checkpoint's
            (:func:`meta.resolve.resolve_inner_loop`; ``None`` values keep them).
        max_length (`int`, *optional*): tokens per text instead of the checkpoint's.
        device (`str`, defaults to ``"auto"``): torch device.

    Returns:
        `(dict, str)`: the summary (per-task and mean accuracy and macro-F1 in percent, with 95%
        CIs, ECE, and ``config``) and the title of its table (:func:`format_table`).

    Raises:
        ArgumentError: naming ``algorithm`` (unknown, or needs a checkpoint) or the inner-loop
            field at fault.
    """
    try:
        model, config = load_model(checkpoint, encoder, resolve_device(device), algorithm)
    except ValueError as error:
        if checkpoint is not None:
            raise
        raise ArgumentError("algorithm", str(error)) from error
    inner = resolve_inner_loop(config.inner_loop, **(inner_loop or {}))
    if max_length is not None:
        model.encoder_config = model.encoder_config.model_copy(update={"max_length": max_length})
    include = domains or (arsc_target_domains(data) if Path(data, "workspace.target.list").exists() else None)
    tasks = list(read_tasks(data, include=include))
    results = evaluate_tasks(
        model, tasks, inner, protocol, support_split, query_split, k_shot, seeds, batch_size, estimate
    )
    summary = summarize(results)
    sampled = protocol == "sampled"
    summary["config"] = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "algorithm": config.algorithm,
        "encoder": config.encoder.name_or_path,
        "max_length": model.max_length(),
        "inner_loop": inner.model_dump(),
        "protocol": protocol,
        "support_split": support_split,
        "query_split": query_split,
        "k_shot": k_shot if sampled else None,
        "seeds": seeds if sampled else None,
    }
    model_name = checkpoint or f"un-meta-trained {config.encoder.name_or_path}"
    return summary, f"{model_name} ({protocol}, {support_split}->{query_split})"


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
            "ece": _mean_or_none([None if r.ece is None else 100 * r.ece for r in rs]),
            **estimate_quality(rs),
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
        "ece": _mean_or_none([t["ece"] for t in tasks.values()]),
        **estimate_quality(results),
    }
    return {"tasks": tasks, "mean": overall, "episodes": [asdict(r) for r in results]}


def estimate_quality(results: Sequence[EpisodeResult]) -> dict[str, float | None]:
    """How good the estimates made at adaptation were, over the episodes that have one.

    Returns:
        `dict`: ``estimate_mae``, the mean absolute difference between estimated and query
        accuracy (points); ``estimate_coverage``, the percentage of episodes whose 95% interval
        holds the query accuracy; ``estimate_seconds``, the median estimate time (seconds);
        ``estimate_cost_ratio``, the median of (adaptation + estimate) / adaptation. All ``None``
        when no episode was estimated.
    """
    rs = [r for r in results if r.estimated_accuracy is not None]
    if not rs:
        return {"estimate_mae": None, "estimate_coverage": None, "estimate_seconds": None, "estimate_cost_ratio": None}
    errors = [100 * abs(r.estimated_accuracy - r.accuracy) for r in rs]  # type: ignore[operator]
    covered = [r.estimate_low <= r.accuracy <= r.estimate_high for r in rs]  # type: ignore[operator]
    seconds = [r.estimate_seconds or 0.0 for r in rs]
    ratios = [(r.adapt_seconds + s) / r.adapt_seconds for r, s in zip(rs, seconds, strict=True) if r.adapt_seconds > 0]
    return {
        "estimate_mae": round(statistics.fmean(errors), 2),
        "estimate_coverage": round(100 * sum(covered) / len(rs), 1),
        "estimate_seconds": round(statistics.median(seconds), 4),
        "estimate_cost_ratio": round(statistics.median(ratios), 3) if ratios else None,
    }


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
    if mean.get("ece") is not None:
        lines.append(f"calibration: ECE {mean['ece']:.2f} points (10 bins, top-label scores)")
    if mean.get("estimate_mae") is not None:
        lines.append(
            f"accuracy estimate at adaptation: MAE {mean['estimate_mae']:.2f} points, 95% interval holds the query "
            f"accuracy in {mean['estimate_coverage']:.1f}% of episodes, median {mean['estimate_seconds']:.4f} s, "
            f"(adaptation + estimate) / adaptation {mean['estimate_cost_ratio']:.3f}"
        )
    return "\n".join(lines)


# -- what to label next: suggested against random labels -------------------------------------------


@dataclass
class ActiveResult:
    """One episode of :func:`evaluate_active`: query accuracy (in [0, 1]) of the K-shot support
    set alone, plus ``k`` suggested labels, and plus ``k`` random labels from the same pool."""

    task: str
    seed: int | None
    base: float
    suggested: float
    random: float
    pool: int
    evaluated: int


def evaluate_active(
    model: MetaLearner,
    episode: Episode,
    inner_config: InnerLoopConfig,
    k: int = 5,
    seed: int = 0,
    max_pool: int = 200,
    max_eval: int = 200,
    batch_size: int = 64,
) -> ActiveResult:
    """Does labelling the suggested texts help more than labelling random ones?

    The query set is shuffled (``seed``) and split in two: an unlabelled pool (at most
    ``max_pool``) and an evaluation set (the rest, at most ``max_eval``). The support set is
    adapted on, ``k`` texts are suggested from the pool (:func:`meta.active.suggest`, BADGE) and
    ``k`` drawn at random from it; each set of ``k`` joins the support set with its gold labels and
    the domain is adapted again. All three are scored on the evaluation set.

    Returns:
        `ActiveResult`: the three accuracies.
    """
    rng = random.Random(f"metasent-active:{episode.task}:{seed}")
    query = list(episode.query)
    rng.shuffle(query)
    half = len(query) // 2
    labelled = {ex.text for ex in episode.support}
    pool = [ex for ex in query[:half] if ex.text not in labelled][:max_pool]  # never a support text
    held = query[half:][:max_eval]
    predictor = Predictor(model, inner_config, batch_size)

    def adapt(extra: Sequence[Example]):
        support = list(episode.support) + list(extra)
        return predictor.adapt([ex.text for ex in support], [ex.label for ex in support], episode.labels)

    base = adapt([])
    picks = suggest(predictor, base, [ex.text for ex in pool], k)
    suggested = adapt([pool[p.index] for p in picks])
    randomly = adapt(rng.sample(pool, min(k, len(pool))))
    texts = [ex.text for ex in held]
    gold = torch.tensor([episode.labels.index(ex.label) for ex in held])
    accuracies = [
        float((probs.argmax(-1) == gold).float().mean())
        for probs in predictor.predict_many([(state, texts) for state in (base, suggested, randomly)])
    ]
    base_acc, suggested_acc, random_acc = accuracies
    return ActiveResult(episode.task, seed, base_acc, suggested_acc, random_acc, len(pool), len(held))


def summarize_active(results: Sequence[ActiveResult]) -> dict[str, Any]:
    """Mean accuracies (points) and the paired differences suggested − random and suggested −
    base, each averaged per task first, then mean ± 95% CI over tasks."""
    by_task: dict[str, list[ActiveResult]] = defaultdict(list)
    for result in results:
        by_task[result.task].append(result)

    def per_task(field: str) -> list[float]:
        return [100 * statistics.fmean(getattr(r, field) for r in rs) for rs in by_task.values()]

    base, suggested, randomly = per_task("base"), per_task("suggested"), per_task("random")
    gain, gain_ci = mean_ci95([s - r for s, r in zip(suggested, randomly, strict=True)])
    over_base, over_base_ci = mean_ci95([s - b for s, b in zip(suggested, base, strict=True)])
    return {
        "tasks": len(by_task),
        "episodes": len(results),
        "base_accuracy": round(statistics.fmean(base), 2),
        "suggested_accuracy": round(statistics.fmean(suggested), 2),
        "random_accuracy": round(statistics.fmean(randomly), 2),
        "suggested_minus_random": round(gain, 2),
        "suggested_minus_random_ci95": round(gain_ci, 2),
        "suggested_minus_base": round(over_base, 2),
        "suggested_minus_base_ci95": round(over_base_ci, 2),
    }
