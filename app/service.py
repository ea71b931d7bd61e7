"""The model service: one base model, adaptation and classification.

A domain keeps only its adapted tensors (the head and the adapted encoder layers); the base
model is loaded once and shared by every domain and request. Domains live in
:class:`app.store.DomainStore`.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import Tensor

from metasent.meta.config import CheckpointConfig
from metasent.meta.inner_loop import Adaptation, embed_texts, inner_loop, is_head_only, predict_proba
from metasent.meta.model import MetaLearner

from .store import DomainStore, StoredDomain


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
    """

    def __init__(
        self,
        model: MetaLearner,
        config: CheckpointConfig,
        batch_size: int = 32,
        max_text_chars: int = 20_000,
        checkpoint_hash: str = "",
    ) -> None:
        self.model = model
        self.config = config
        self.checkpoint_hash = checkpoint_hash
        self.batch_size = batch_size
        self.max_text_chars = max_text_chars
        self._lock = threading.Lock()
        self._counter: Any = None  # a copy of the tokenizer for token counts, off the model's lock
        self._counter_lock = threading.Lock()

    @property
    def device(self) -> str:
        return str(self.model.device)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text before truncation (special tokens included), of its first
        ``max_text_chars`` characters."""
        with self._counter_lock:
            if self._counter is None:
                self._counter = copy.deepcopy(self.model.tokenizer)
            ids = self._counter([t[: self.max_text_chars] for t in texts], truncation=False, verbose=False)
        return [len(row) for row in ids["input_ids"]]

    def truncated(self, texts: list[str]) -> list[bool]:
        """Whether each text is cut before the encoder sees all of it (over ``max_text_chars``
        characters or over the encoder's ``max_length`` tokens)."""
        limit = self.model.max_length()
        counts = self.token_counts(texts)
        return [len(t) > self.max_text_chars or n > limit for t, n in zip(texts, counts, strict=True)]

    def adapt(self, texts: list[str], labels: list[str]) -> Adaptation:
        """Run the checkpoint's inner loop on a support set (see :func:`meta.inner_loop.inner_loop`)."""
        texts = [t[: self.max_text_chars] for t in texts]
        with self._lock:
            return inner_loop(self.model, texts, labels, self.config.inner_loop)

    def classify(self, params: dict[str, Tensor], texts: list[str]) -> Tensor:
        """Probabilities (texts, classes) of ``texts`` under a domain's adapted ``params``."""
        return self.classify_many([(params, texts)])[0]

    def classify_many(self, requests: list[tuple[dict[str, Tensor], list[str]]]) -> list[Tensor]:
        """Classify several requests in as few encoder passes as possible.

        Domains that adapted only the head share one pass of the base encoder over the union of
        their texts (each distinct text encoded once); other requests are grouped by domain and
        each group runs one length-sorted pass.

        Args:
            requests: ``(params, texts)`` pairs; ``params`` are a domain's adapted tensors.

        Returns:
            `list[Tensor]`: per request, (texts, classes) probabilities in input order.
        """
        requests = [(params, [t[: self.max_text_chars] for t in texts]) for params, texts in requests]
        results: list[Tensor | None] = [None] * len(requests)
        with self._lock:
            shared = [i for i, (params, _) in enumerate(requests) if is_head_only(params)]
            if shared:
                unique = list(dict.fromkeys(t for i in shared for t in requests[i][1]))
                index = {text: row for row, text in enumerate(unique)}
                z = embed_texts(self.model, unique, self.batch_size).to(self.model.device)  # (unique, hidden)
                with torch.inference_mode():
                    for i in shared:
                        params, texts = requests[i]
                        rows = z[torch.tensor([index[t] for t in texts], dtype=torch.long)]
                        results[i] = self.model.head_logits(params, rows).float().softmax(-1).cpu()
            groups: dict[int, list[int]] = {}
            for i, (params, _) in enumerate(requests):
                if results[i] is None:
                    groups.setdefault(id(params), []).append(i)
            for members in groups.values():
                texts = [t for i in members for t in requests[i][1]]
                probs = predict_proba(self.model, requests[members[0]][0], texts, self.batch_size)
                offset = 0
                for i in members:
                    results[i] = probs[offset : offset + len(requests[i][1])]
                    offset += len(requests[i][1])
        return [r for r in results if r is not None]


__all__ = ["DomainStore", "ModelService", "StoredDomain"]
