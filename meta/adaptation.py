"""Adaptation and prediction on one base model: :class:`Predictor`, the server's entry point, and
the public names of adaptation for the service, evaluation and meta-training.

Meta-training (:mod:`meta.algorithms`), evaluation (:mod:`meta.evaluate`) and the server all adapt
through the same inner loop, so what the service does at adaptation time is exactly what the
meta-parameters were trained for (Finn et al. 2017, "Model-Agnostic Meta-Learning", Algorithm 1).
The pieces live in their own modules and are re-exported here:

- :mod:`meta.heads`: the few-shot heads, :class:`PrototypeHead` (Proto-MAML, Triantafillou et al.
  2020) and :class:`MatchingHead` (Vinyals et al. 2016), chosen by ``InnerLoopConfig.classifier``
  through :data:`HEADS`;
- :mod:`meta.inner`: :func:`inner_loop`, which adapts a head and the top encoder layers to a
  support set and returns an :class:`AdaptedState` (serialised to named tensors by
  :meth:`AdaptedState.to_tensors` and back), and its pure update maths;
- :mod:`meta.estimate`: the held-out accuracy estimate at adaptation (:func:`estimate_accuracy`).

A :class:`Predictor` adapts and classifies, sharing one base-encoder pass between states that
adapted no encoder tensor (:meth:`Predictor.predict_many`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .config import InnerLoopConfig
from .estimate import AccuracyEstimate, estimate_accuracy, estimate_interval, held_out_folds, wilson_interval
from .heads import HEAD_PREFIX, HEADS, Head, MatchingHead, PrototypeHead, head_from_tensors
from .inner import (
    AdaptedState,
    anchor_texts,
    autocast,
    encode_labels,
    init_head,
    inner_loop,
    sgd_step,
    straight_through,
)
from .model import MetaLearner

SHARED_ENCODER_KEY = "shared-encoder"
"""The micro-batch key of every state that adapted no encoder tensor (see :meth:`Predictor.batch_key`)."""


def _map_sorted(
    model: MetaLearner, texts: Sequence[str], batch_size: int, fn: Callable[[dict[str, Tensor]], Tensor]
) -> Tensor | None:
    """Apply ``fn`` to length-sorted batches of ``texts`` (each padded to its longest text) and
    return the rows in input order on the CPU, or ``None`` for no texts."""
    if not texts:
        return None
    was_training = model.training
    model.eval()
    token_ids = model.encode(texts)  # tokenised once
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))
    out: Tensor | None = None
    try:
        with torch.inference_mode(), autocast(model.device):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                rows = fn(model.collate([token_ids[i] for i in chunk])).float().cpu()  # (chunk, ...)
                if out is None:
                    out = rows.new_empty((len(texts), *rows.shape[1:]))
                out[torch.tensor(chunk)] = rows
    finally:
        model.train(was_training)
    return out


def _same_tensors(state: AdaptedState) -> tuple[int, ...]:
    """A key equal for states holding the very same tensor objects (one stored domain)."""
    return tuple(id(t) for t in state.to_tensors().values())


class Predictor:
    """Adapts and classifies on one base model with the checkpoint's inner loop.

    Texts are tokenised once, sorted by token count and batched so that padding is short (bf16
    autocast on CUDA); results come back in input order, on the CPU. Not thread-safe: callers
    serialise their use of the model.

    Args:
        model (`MetaLearner`): the base model (meta-parameters).
        inner_config (`InnerLoopConfig`): the adaptation :meth:`adapt` runs.
        batch_size (`int`, defaults to 32): texts per forward pass when predicting.
    """

    def __init__(self, model: MetaLearner, inner_config: InnerLoopConfig, batch_size: int = 32) -> None:
        self.model = model
        self.inner_config = inner_config
        self.batch_size = batch_size

    def adapt(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        label_names: Sequence[str] | None = None,
        estimate: bool = False,
        folds: int = 5,
    ) -> AdaptedState:
        """Run the inner loop (:func:`inner_loop`) on a support set of ``texts`` and ``labels``;
        ``label_names`` fixes the class order (default: order of first appearance). With
        ``estimate``, the state also carries :func:`estimate_accuracy`'s held-out estimate
        (``folds`` folds when the inner loop takes steps, leave-one-out when it takes none).

        Raises:
            ValueError: when there are fewer than 2 labels, or texts and labels differ in length.
        """
        state = inner_loop(self.model, texts, labels, self.inner_config, label_names)
        if estimate:
            state.estimate = estimate_accuracy(self, state, texts, labels, folds)
        return state

    def probabilities(self, state: AdaptedState, z: Tensor) -> Tensor:
        """Class probabilities (texts, N), float32, rows summing to 1, of embeddings ``z`` (texts,
        hidden) made by ``state``'s encoder: the head's logits at the meta-learned temperature."""
        return state.head.logits(z, self.model.logit_scale).float().softmax(-1)

    def predict_proba(self, state: AdaptedState, texts: Sequence[str]) -> Tensor:
        """Class probabilities (texts, N) of ``texts`` under ``state``, rows summing to 1."""
        model = self.model

        def probabilities(batch: dict[str, Tensor]) -> Tensor:
            return self.probabilities(state, model.embed(state.encoder, batch))

        out = _map_sorted(model, texts, self.batch_size, probabilities)
        return out if out is not None else torch.empty(0, state.num_classes)

    def embed_and_predict(self, state: AdaptedState, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The embeddings (texts, hidden) of ``texts`` at ``state``'s adapted encoder and their class
        probabilities (texts, N), on the CPU, in input order, from one encoder pass."""
        model = self.model

        def both(batch: dict[str, Tensor]) -> Tensor:
            z = model.embed(state.encoder, batch)  # (batch, hidden)
            probs = self.probabilities(state, z)  # (batch, N)
            return torch.cat([z.float(), probs], -1)

        out = _map_sorted(model, texts, self.batch_size, both)
        hidden = int(model.encoder.config.hidden_size)
        if out is None:
            return torch.empty(0, hidden), torch.empty(0, state.num_classes)
        return out[:, :hidden], out[:, hidden:]

    def predict(self, state: AdaptedState, texts: Sequence[str]) -> list[str]:
        """The most probable label of each text under ``state``, in input order."""
        return [state.labels[i] for i in self.predict_proba(state, texts).argmax(-1).tolist()]

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Base-model embeddings (texts, hidden) on the CPU, in input order."""
        out = _map_sorted(self.model, texts, self.batch_size, lambda batch: self.model.embed({}, batch))
        return out if out is not None else torch.empty(0, int(self.model.encoder.config.hidden_size))

    def predict_many(self, requests: Sequence[tuple[AdaptedState, Sequence[str]]]) -> list[Tensor]:
        """Classify several requests in as few encoder passes as possible.

        States that share the encoder (:attr:`AdaptedState.shares_encoder`) get one pass of the base
        encoder over the union of their texts (each distinct text encoded once); the other requests
        are grouped by state (the same tensors) and each group runs one length-sorted pass.

        Args:
            requests: ``(state, texts)`` pairs.

        Returns:
            `list[Tensor]`: per request, (texts, N) probabilities in input order, on the CPU.
        """
        results: list[Tensor | None] = [None] * len(requests)
        shared = [i for i, (state, _) in enumerate(requests) if state.shares_encoder]
        if shared:
            unique = list(dict.fromkeys(t for i in shared for t in requests[i][1]))
            index = {text: row for row, text in enumerate(unique)}
            z = self.embed(unique).to(self.model.device)  # (unique, hidden)
            with torch.inference_mode():
                for i in shared:
                    state, texts = requests[i]
                    rows = z[torch.tensor([index[t] for t in texts], dtype=torch.long)]
                    results[i] = self.probabilities(state, rows).cpu()
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (state, _) in enumerate(requests):
            if results[i] is None:
                groups.setdefault(_same_tensors(state), []).append(i)
        for members in groups.values():
            texts = [t for i in members for t in requests[i][1]]
            probs = self.predict_proba(requests[members[0]][0], texts)
            offset = 0
            for i in members:
                results[i] = probs[offset : offset + len(requests[i][1])]
                offset += len(requests[i][1])
        return [r for r in results if r is not None]

    @staticmethod
    def batch_key(state: AdaptedState, domain_id: str) -> str:
        """The micro-batch key of a request: :data:`SHARED_ENCODER_KEY` for every state that shares
        the encoder (their requests share one base-encoder pass), else the domain id."""
        return SHARED_ENCODER_KEY if state.shares_encoder else domain_id


__all__ = [
    "HEADS",
    "HEAD_PREFIX",
    "AccuracyEstimate",
    "SHARED_ENCODER_KEY",
    "AdaptedState",
    "Head",
    "MatchingHead",
    "Predictor",
    "PrototypeHead",
    "anchor_texts",
    "autocast",
    "encode_labels",
    "estimate_accuracy",
    "estimate_interval",
    "held_out_folds",
    "head_from_tensors",
    "init_head",
    "inner_loop",
    "sgd_step",
    "straight_through",
    "wilson_interval",
]
