"""The model service: the one base model, its lock and the adaptation API around it.

A domain keeps only its adapted tensors (the head and the adapted encoder layers); the base
model is loaded once and shared by every domain and request. Adaptation and prediction are
:class:`meta.adaptation.Predictor`'s; this holder adds the lock that serialises torch work, the
character limit on texts and token counts. Domains live in :class:`app.storage.DomainStore`
(SQL: :class:`app.store.SqlDomainStore`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from metasent.meta.active import Suggestion, suggest
from metasent.meta.adaptation import AdaptedState, Predictor
from metasent.meta.config import CheckpointConfig
from metasent.meta.model import MetaLearner


class ModelService:
    """Runs the checkpoint's inner loop and classification on the one base model.

    Torch work is serialised by a lock and meant to be called from a worker thread, never on
    the event loop.

    Args:
        model (`MetaLearner`): the base model (meta-parameters), in eval mode.
        config (`CheckpointConfig`): its config; ``config.inner_loop`` is the adaptation run.
        batch_size (`int`, defaults to 32): texts per forward pass when classifying.
        max_text_chars (`int`, defaults to 20000): characters of each text passed to the
            tokenizer.
        checkpoint_hash (`str`, defaults to ``""``): the model's fingerprint (see
            :func:`meta.checkpoint.model_fingerprint`), recorded with every domain adapted on it.
        checkpoint (`Path | None`): the checkpoint directory it was loaded from (``None``: the
            un-meta-trained encoder).
        estimate_folds (`int | None`, defaults to 5): folds of the held-out accuracy estimate when
            the inner loop takes steps (:func:`meta.adaptation.estimate_accuracy`); ``None``: no
            estimate.
    """

    def __init__(
        self,
        model: MetaLearner,
        config: CheckpointConfig,
        batch_size: int = 32,
        max_text_chars: int = 20_000,
        checkpoint_hash: str = "",
        checkpoint: Path | None = None,
        estimate_folds: int | None = 5,
    ) -> None:
        self.model = model
        self.config = config
        self.checkpoint_hash = checkpoint_hash
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.max_text_chars = max_text_chars
        self.estimate_folds = estimate_folds
        self.predictor = Predictor(model, config.inner_loop, batch_size)
        self._lock = threading.Lock()
        self._counter: Any = None  # a copy of the tokenizer for token counts, off the model's lock
        self._counter_lock = threading.Lock()

    @property
    def device(self) -> str:
        return str(self.model.device)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text before truncation (special tokens and the encoder's text prefix
        included), of its first ``max_text_chars`` characters."""
        prefix = self.model.encoder_config.text_prefix
        with self._counter_lock:
            if self._counter is None:
                self._counter = copy.deepcopy(self.model.tokenizer)
            ids = self._counter([prefix + t for t in self._cut(texts)], truncation=False, verbose=False)
        return [len(row) for row in ids["input_ids"]]

    def truncated(self, texts: list[str]) -> list[bool]:
        """Whether each text is cut before the encoder sees all of it (over ``max_text_chars``
        characters or over the encoder's ``max_length`` tokens)."""
        limit = self.model.max_length()
        counts = self.token_counts(texts)
        return [len(t) > self.max_text_chars or n > limit for t, n in zip(texts, counts, strict=True)]

    def _cut(self, texts: Sequence[str]) -> list[str]:
        return [t[: self.max_text_chars] for t in texts]

    def adapt(self, texts: list[str], labels: list[str]) -> AdaptedState:
        """Run the checkpoint's inner loop on a support set (:meth:`meta.adaptation.Predictor.adapt`),
        with its held-out accuracy estimate (``state.estimate``) unless ``estimate_folds`` is ``None``."""
        texts = self._cut(texts)
        with self._lock:
            if self.estimate_folds is None:
                return self.predictor.adapt(texts, labels)
            return self.predictor.adapt(texts, labels, estimate=True, folds=self.estimate_folds)

    def suggest(self, state: AdaptedState, texts: list[str], k: int, exclude: Sequence[str]) -> list[Suggestion]:
        """The ``k`` texts to label next for ``state`` (:func:`meta.active.suggest`, BADGE), never
        one of ``exclude``; indices refer to ``texts``."""
        cut = self._cut(texts)
        with self._lock:
            picks = suggest(self.predictor, state, cut, k, exclude=self._cut(exclude))
        return [dataclasses.replace(pick, text=texts[pick.index]) for pick in picks]

    def classify(self, state: AdaptedState, texts: list[str]) -> Tensor:
        """Probabilities (texts, classes) of ``texts`` under an adapted ``state``."""
        return self.classify_many([(state, texts)])[0]

    def classify_many(self, requests: list[tuple[AdaptedState, list[str]]]) -> list[Tensor]:
        """Probabilities (texts, classes) per ``(state, texts)`` request, in as few encoder passes
        as possible (:meth:`meta.adaptation.Predictor.predict_many`)."""
        requests = [(state, self._cut(texts)) for state, texts in requests]
        with self._lock:
            return self.predictor.predict_many(requests)

    def batch_key(self, state: AdaptedState, domain_id: str) -> str:
        """The micro-batch key of a classify request (:meth:`meta.adaptation.Predictor.batch_key`)."""
        return self.predictor.batch_key(state, domain_id)

    @staticmethod
    def state(tensors: dict[str, Tensor], labels: Sequence[str]) -> AdaptedState:
        """A stored domain's adapted state from its tensors and labels.

        Raises:
            ValueError: when the tensors hold no known head, or not one class per label.
        """
        return AdaptedState.from_tensors(tensors, labels)

    def info(self, state: AdaptedState, support_labels: Sequence[str]) -> dict[str, Any]:
        """The figures of an adaptation the API shows (and the store keeps): steps, seconds,
        support accuracy, the held-out ``estimated_accuracy`` (``None`` when no label has 2
        examples) and the support set's ``warnings`` (:func:`support_warnings`)."""
        return {
            "steps": state.steps,
            "seconds": round(state.seconds, 4),
            "device": self.device,
            "support_accuracy": round(state.support_accuracy, 4),
            "estimated_accuracy": state.estimate.to_dict() if state.estimate is not None else None,
            "warnings": support_warnings(support_labels),
        }


IMBALANCE_RATIO = 3.0
"""A support set whose largest label has at least this many times the examples of its smallest is
called unbalanced."""


def support_warnings(labels: Sequence[str]) -> list[dict[str, str]]:
    """What a user should know about a support set before relying on its domain: each label with
    fewer than 2 examples (it cannot be held out, so the estimate leaves it out, and one example is
    a weak description of a class), and labels very unbalanced (largest/smallest count at least
    :data:`IMBALANCE_RATIO`: the estimate and the head then lean towards the larger label).

    Returns:
        `list[dict[str, str]]`: ``{"code", "message"}`` each; empty when there is nothing to say.
    """
    counts = Counter(labels)
    warnings = [
        {
            "code": "few_examples",
            "message": f"label {label!r} has {n} example; give at least 2 per label (5 or more is better): "
            "it is left out of estimated_accuracy",
        }
        for label, n in counts.items()
        if n < 2
    ]
    if counts and all(n < 2 for n in counts.values()):
        warnings.append({"code": "no_estimate", "message": "no label has 2 examples, so accuracy cannot be estimated"})
    most, least = max(counts.values(), default=0), min(counts.values(), default=0)
    if least and most / least >= IMBALANCE_RATIO:
        big, small = counts.most_common()[0][0], counts.most_common()[-1][0]
        warnings.append(
            {
                "code": "unbalanced_labels",
                "message": f"label {big!r} has {most} examples and {small!r} only {least}: add examples of the "
                "smaller labels; the estimate and the predictions lean towards the larger one",
            }
        )
    return warnings


__all__ = ["AdaptedState", "ModelService", "Suggestion", "support_warnings"]
