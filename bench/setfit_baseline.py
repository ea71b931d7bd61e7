"""SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts") as an external
baseline: contrastive fine-tuning of the same sentence encoder on pairs of support examples, then a
logistic-regression head. Needs the optional ``bench`` extra (``pip install -e '.[bench]'``); the
service never imports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from metasent.data.episodes import Episode
from metasent.meta.evaluate import EpisodeResult, score_episode

logger = logging.getLogger(__name__)


def setfit_available() -> bool:
    """Whether the ``setfit`` package can be imported."""
    try:
        import setfit  # noqa: F401
    except Exception:  # ImportError, or a dependency that fails to import
        return False
    return True


def setfit_episode(
    encoder_path: str,
    episode: Episode,
    seed: int | None = None,
    num_iterations: int = 20,
    num_epochs: int = 1,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | None = None,
) -> EpisodeResult:
    """Train SetFit on ``episode.support`` and score ``episode.query``.

    Args:
        encoder_path (`str`): a sentence-transformers model folder (the same encoder as metasent's).
        episode (`Episode`): support and query sets.
        seed (`int`, *optional*): recorded in the result and used as the training seed (0 if None).
        num_iterations (`int`, defaults to 20): contrastive pairs generated per support example
            (SetFit's default).
        num_epochs (`int`, defaults to 1): epochs of contrastive training.
        batch_size (`int`, defaults to 16): pairs per step.
        max_length (`int`, defaults to 128): tokens per text.
        device (`str`, *optional*): torch device (default: SetFit's choice).

    Returns:
        `EpisodeResult`: accuracy, macro-F1 and ``adapt_seconds`` (training wall time).

    Raises:
        ImportError: when ``setfit`` is not installed.
    """
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    labels = list(episode.labels)
    index = {label: i for i, label in enumerate(labels)}
    start = time.perf_counter()
    model = SetFitModel.from_pretrained(encoder_path, device=device)
    model.model_body.max_seq_length = max_length
    train = Dataset.from_dict(
        {"text": [ex.text for ex in episode.support], "label": [index[ex.label] for ex in episode.support]}
    )
    args = TrainingArguments(
        batch_size=batch_size, num_epochs=num_epochs, num_iterations=num_iterations, seed=seed or 0
    )
    Trainer(model=model, args=args, train_dataset=train).train()
    seconds = time.perf_counter() - start
    support_pred = [labels[int(p)] for p in model.predict([ex.text for ex in episode.support])]
    probs = torch.as_tensor(model.predict_proba([ex.text for ex in episode.query])).float()  # (query, N)
    predicted = [labels[int(p)] for p in probs.argmax(-1)]
    support_accuracy = sum(p == ex.label for p, ex in zip(support_pred, episode.support, strict=True)) / len(
        episode.support
    )
    return score_episode(episode, predicted, seed, seconds, support_accuracy, probs)


def evaluate_setfit(encoder_path: str, episodes: Sequence[tuple[Episode, int | None]], **kwargs) -> list[EpisodeResult]:
    """:func:`setfit_episode` over ``(episode, seed)`` pairs."""
    results = []
    for episode, seed in episodes:
        results.append(setfit_episode(encoder_path, episode, seed, **kwargs))
        logger.info("setfit %s seed %s: %.1f%%", episode.task, seed, 100 * results[-1].accuracy)
    return results
