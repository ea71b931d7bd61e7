"""What to label next: pick unlabelled texts whose labels would most improve a domain.

Batch active learning by BADGE (Ash et al. 2020, "Deep Batch Active Learning by Diverse,
Uncertain Gradient Lower Bounds", ICLR): each candidate is represented by the gradient of the
cross-entropy, at its own predicted label, with respect to a linear classifier on its embedding,
``g = (p - onehot(argmax p)) ⊗ z``. Its norm grows with the model's uncertainty (``1 - max p``)
and its direction with the text's content, so k-means++ seeding (Arthur & Vassilvitskii 2007) over
these vectors picks texts that are both uncertain and unlike each other, instead of k
near-duplicates of the single most uncertain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adaptation import AdaptedState, Predictor


@dataclass(frozen=True)
class Suggestion:
    """One text to label.

    Args:
        index (`int`): its position in the candidate texts.
        text (`str`): the text.
        probabilities (`Tensor`): (N,) the domain's current class probabilities for it.
        uncertainty (`float`): ``1 - max p``, in [0, 1 - 1/N].
    """

    index: int
    text: str
    probabilities: Tensor
    uncertainty: float


def gradient_embeddings(probs: Tensor, embeddings: Tensor) -> Tensor:
    """BADGE's gradient embeddings.

    Args:
        probs (`Tensor`): (B, N) class probabilities.
        embeddings (`Tensor`): (B, hidden) text embeddings.

    Returns:
        `Tensor`: (B, N * hidden), row ``b`` is ``(p_b - onehot(argmax p_b)) ⊗ z_b``, the gradient
        of the cross-entropy at the predicted label with respect to a linear head's weight.
    """
    residual = probs - torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)  # (B, N)
    return (residual.unsqueeze(2) * embeddings.unsqueeze(1)).flatten(1)  # (B, N * hidden)


def kmeans_pp(points: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k-means++ seeding as BADGE uses it: the first point is the one of largest norm, each next
    one is drawn with probability proportional to its squared distance to the nearest chosen
    point (points already chosen, or identical to one, have probability 0).

    Args:
        points (`Tensor`): (B, D).
        k (`int`): points to choose, at most B.
        generator (`torch.Generator`): the draw's random source (same seed, same picks).

    Returns:
        `list[int]`: ``min(k, B)`` distinct row indices, in the order chosen. When every remaining
        point coincides with a chosen one (all distances 0), the rest are taken by largest norm.
    """
    points = points.double()
    chosen = [int(points.norm(dim=1).argmax())] if len(points) and k > 0 else []
    nearest = ((points - points[chosen[0]]) ** 2).sum(1) if chosen else torch.empty(0, dtype=torch.float64)
    while len(chosen) < min(k, len(points)):
        weights = nearest.clone()
        weights[chosen] = 0
        if float(weights.sum()) <= 0:  # only copies of chosen points are left
            order = points.norm(dim=1).argsort(descending=True).tolist()
            chosen += [i for i in order if i not in chosen][: k - len(chosen)]
            break
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(1))
    return chosen


def suggest(
    predictor: Predictor,
    state: AdaptedState,
    texts: Sequence[str],
    k: int,
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> list[Suggestion]:
    """The ``k`` texts whose labels would most improve the domain, by BADGE.

    Each distinct text is a candidate once; texts in ``exclude`` (e.g. the support set) are never
    suggested.

    Args:
        predictor (`Predictor`): the model the domain was adapted on.
        state (`AdaptedState`): the domain.
        texts (`Sequence[str]`): unlabelled candidates.
        k (`int`): how many to suggest (fewer when fewer distinct candidates remain).
        exclude (`Sequence[str]`): texts that are already labelled.
        seed (`int`, defaults to 0): the k-means++ draw's seed.

    Returns:
        `list[Suggestion]`: in the order chosen (the first is the most uncertain).

    Raises:
        ValueError: when ``k`` is below 1.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    labelled = set(exclude)
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text not in labelled:
            first.setdefault(text, i)
    candidates = list(first)
    if not candidates:
        return []
    z, probs = predictor.embed_and_predict(state, candidates)  # (C, hidden), (C, N)
    picks = kmeans_pp(gradient_embeddings(probs, z), k, torch.Generator().manual_seed(seed))
    return [Suggestion(first[candidates[i]], candidates[i], probs[i], float(1 - probs[i].max())) for i in picks]


__all__ = ["Suggestion", "gradient_embeddings", "kmeans_pp", "suggest"]
