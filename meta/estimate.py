"""The accuracy estimate at adaptation: how well an adapted domain is expected to classify new
texts, from its support set alone (held-out predictions by cross-validation with the same inner
loop), with a 95% interval (Wilson 1927, widened by a dev-measured task-level spread).

:meth:`meta.adaptation.Predictor.adapt` makes it with ``estimate=True``; the server reports it at
``POST /v1/domains`` and ``metasent benchmark`` measures its error and coverage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import InnerLoopConfig
from .inner import AdaptedState, encode_labels, init_head, inner_loop
from .model import MetaLearner

if TYPE_CHECKING:
    from .adaptation import Predictor

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


@dataclass(frozen=True)
class AccuracyEstimate:
    """How well an adapted domain is expected to classify new texts, from its support set alone.

    Args:
        accuracy (`float`): held-out accuracy in [0, 1].
        low, high (`float`): its 95% interval, in [0, 1] (:func:`estimate_interval`).
        n (`int`): held-out predictions it counts (support examples whose label has at least 2).
        method (`str`): ``"leave-one-out"`` or ``"<F>-fold"``.
        seconds (`float`): wall time of the estimate, seconds (beside the adaptation's own).
    """

    accuracy: float
    low: float
    high: float
    n: int
    method: str
    seconds: float

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready, rounded to 4 decimals."""
        return {
            "accuracy": round(self.accuracy, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "n": self.n,
            "method": self.method,
            "seconds": round(self.seconds, 4),
        }


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (Wilson 1927, "Probable
    Inference, the Law of Succession, and Statistical Inference"); unlike the normal interval it
    stays inside [0, 1] and is not empty at 0 or n successes.

    Raises:
        ValueError: when ``n < 1`` or ``correct`` is not in ``[0, n]``.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate_interval(correct: int, n: int, task_sd: float | None = None, z: float = Z95) -> tuple[float, float]:
    """The 95% interval of a task's accuracy on new texts from ``correct`` of ``n`` held-out
    support predictions.

    Without ``task_sd`` it is the Wilson interval (:func:`wilson_interval`): only the binomial noise
    of ``n`` predictions. That ignores how far a task's query set can be from its support set (a
    class balance the support set does not show, harder texts), so across tasks it holds the truth
    less often than 95%. With ``task_sd``, that task-level spread, measured on dev tasks, is added
    in quadrature to the binomial variance at the Wilson centre ``p~``:
    ``p~ ± z sqrt(p~(1 - p~) / (n + z^2) + task_sd^2)``, clipped to [0, 1] and never narrower than
    the Wilson interval.

    Raises:
        ValueError: when ``n < 1`` or ``correct`` is not in ``[0, n]``.
    """
    low, high = wilson_interval(correct, n, z)
    if not task_sd:
        return low, high
    centre = (correct + z * z / 2) / (n + z * z)
    half = z * math.sqrt(centre * (1 - centre) / (n + z * z) + task_sd * task_sd)
    return max(0.0, min(low, centre - half)), min(1.0, max(high, centre + half))


def held_out_folds(targets: Sequence[int], folds: int | None) -> list[list[int]]:
    """Stratified folds of the support examples that can be held out: those whose class has at
    least 2 examples, so that every class keeps one in each fold's training part.

    Args:
        targets (`Sequence[int]`): (N*K,) class ids.
        folds (`int | None`): number of folds F (at least 2); ``None`` for leave-one-out (each
            eligible example its own fold).

    Returns:
        `list[list[int]]`: per fold, the indices it holds out; empty folds are dropped. Within a
        class, the example of rank r goes to fold ``r mod F``, so a class of ``c >= 2`` examples
        loses at most ``ceil(c / F) <= c - 1`` of them per fold.

    Raises:
        ValueError: when ``folds`` is below 2.
    """
    if folds is not None and folds < 2:
        raise ValueError(f"folds must be at least 2 (or None for leave-one-out), got {folds}")
    members: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        members.setdefault(int(target), []).append(i)
    eligible = [(rank, i) for rows in members.values() if len(rows) >= 2 for rank, i in enumerate(rows)]
    if folds is None:
        return [[i] for _, i in sorted(eligible, key=lambda pair: pair[1])]
    out: list[list[int]] = [[] for _ in range(folds)]
    for rank, i in eligible:
        out[rank % folds].append(i)
    return [sorted(fold) for fold in out if fold]


def _leave_one_out_hits(
    model: MetaLearner, state: AdaptedState, targets: Tensor, config: InnerLoopConfig, held_out: list[list[int]]
) -> list[bool]:
    """Leave-one-out without re-adapting (no inner step was taken): per held-out example, the head
    built from the other support rows (anchors kept) classifies its embedding."""
    z = state.support_embeddings
    if z is None:
        raise ValueError("the state holds no support embeddings (adapt with score_support=True)")
    n_support = targets.shape[0]
    hits = []
    with torch.no_grad():
        for fold in held_out:
            keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            keep[fold] = False
            head = init_head(model, z[keep], targets[keep[:n_support]], state.num_classes, config)
            predicted = head.logits(z[fold], model.logit_scale.detach()).argmax(-1)  # (fold,)
            hits += (predicted == targets[fold]).tolist()
    return hits


def estimate_accuracy(
    predictor: Predictor, state: AdaptedState, texts: Sequence[str], labels: Sequence[str], folds: int = 5
) -> AccuracyEstimate | None:
    """Estimate the accuracy of an adapted domain on new texts by cross-validation over its
    support set with the same inner loop.

    With no inner step (the head is a function of the support embeddings) this is exact
    leave-one-out from the embeddings the adaptation already computed, at the cost of N*K head
    builds. With inner steps, the inner loop runs again once per fold on the other folds'
    examples (``folds`` stratified folds, :func:`held_out_folds`), so it costs about ``folds``
    adaptations. Examples whose label has a single support example are never held out. The 95%
    interval is :func:`estimate_interval`'s: Wilson's over the held-out predictions, widened by the
    inner loop's ``estimate_task_sd`` when the model has one; its coverage is measured in
    ``metasent benchmark``.

    Args:
        predictor (`Predictor`): the model and inner loop that adapted ``state``.
        state (`AdaptedState`): the adaptation on the whole support set (class order ``state.labels``).
        texts (`Sequence[str]`), labels (`Sequence[str]`): the support set, N*K each.
        folds (`int`, defaults to 5): folds when the inner loop takes steps (at least 2).

    Returns:
        `AccuracyEstimate | None`: ``None`` when no label has 2 examples (nothing can be held out).

    Raises:
        ValueError: when ``folds`` is below 2 or a label is not in ``state.labels``.
    """
    start = time.perf_counter()
    config = predictor.inner_config
    model = predictor.model
    targets = encode_labels(labels, state.labels, model.device)  # (N*K,)
    exact = config.steps == 0 and state.support_embeddings is not None
    held_out = held_out_folds(targets.tolist(), None if exact else folds)
    if not held_out:
        return None
    if exact:
        hits = _leave_one_out_hits(model, state, targets, config, held_out)
    else:
        hits = []
        for fold in held_out:
            out = set(fold)
            rest = [i for i in range(len(texts)) if i not in out]
            fold_state = inner_loop(
                model, [texts[i] for i in rest], [labels[i] for i in rest], config, state.labels, score_support=False
            )
            predicted = predictor.predict_proba(fold_state, [texts[i] for i in fold]).argmax(-1)  # (fold,)
            hits += (predicted == targets[fold].cpu()).tolist()
    correct, n = sum(hits), len(hits)
    low, high = estimate_interval(correct, n, config.estimate_task_sd)
    method = "leave-one-out" if exact else f"{len(held_out)}-fold"
    return AccuracyEstimate(correct / n, low, high, n, method, time.perf_counter() - start)
