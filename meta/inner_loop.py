"""The inner loop: adapt a few parameters to a task's support set with SGD.

This one function is used by meta-training (:mod:`meta.fomaml`), evaluation and the server, so
that what the service does at adaptation time is exactly what the meta-parameters were trained
for (Finn et al. 2017, "Model-Agnostic Meta-Learning", Algorithm 1, inner update).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import InnerLoopConfig
from .model import (
    HEAD_KEYS,
    FrozenFeatures,
    MetaLearner,
    Params,
    anchor_texts,
    matching_head,
    num_classes,
    prototype_head,
)


@dataclass
class Adaptation:
    """The result of the inner loop on one support set.

    Args:
        params (`dict[str, Tensor]`): the adapted tensors only (head and adapted encoder layers),
            detached; every other tensor is the base model's.
        labels (`tuple[str, ...]`): class names; class id ``i`` is ``labels[i]``.
        support_losses (`list[float]`): support cross-entropy before each step and after the last
            (``steps + 1`` values, nats).
        support_accuracy (`float`): accuracy of the adapted parameters on the support set.
        steps (`int`): SGD steps taken.
        seconds (`float`): wall time of the adaptation.
    """

    params: Params
    labels: tuple[str, ...]
    support_losses: list[float]
    support_accuracy: float
    steps: int
    seconds: float


def sgd_step(params: Params, grads: Sequence[Tensor], lr: float, clip: float | None) -> Params:
    """One SGD update ``theta - lr * g`` with ``g`` clipped to global L2 norm ``clip``; pure.

    Args:
        params: tensors by name, in the same order as ``grads``.
        grads: their gradients.
        lr (`float`): learning rate.
        clip (`float | None`): maximum global gradient norm, ``None`` for no clipping.

    Returns:
        `dict[str, Tensor]`: new leaf tensors that require grad.
    """
    factor = 1.0
    if clip is not None:
        norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))  # type: ignore[arg-type]
        factor = min(1.0, clip / (float(norm) + 1e-12))
    return {
        name: (p.detach() - lr * factor * g.detach()).requires_grad_(True)
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def encode_labels(labels: Sequence[str], label_names: Sequence[str], device: torch.device) -> Tensor:
    """Class ids (examples,) of ``labels`` in ``label_names``.

    Raises:
        KeyError: when a label is not in ``label_names``.
    """
    index = {name: i for i, name in enumerate(label_names)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long, device=device)


def inner_loop(
    model: MetaLearner,
    support_texts: Sequence[str],
    support_labels: Sequence[str],
    config: InnerLoopConfig,
    label_names: Sequence[str] | None = None,
    initial_head: Mapping[str, Tensor] | None = None,
    cache_frozen: bool = True,
    support_features: FrozenFeatures | None = None,
) -> Adaptation:
    """Adapt the head and the top ``config.adapted_layers`` encoder layers to a support set.

    The head starts from the support prototypes (:func:`meta.model.prototype_head`; with
    ``config.label_anchors`` each label name joins its prototype as a weighted example), then
    ``config.steps`` SGD steps at learning rate ``config.lr`` minimise the support cross-entropy.
    With ``config.classifier == "matching"`` the head is the support set itself
    (:func:`meta.model.matching_head`) and no step is taken.
    Dropout is off (the model is used in eval mode), so the same support set always gives the
    same adapted parameters.

    Args:
        model (`MetaLearner`): the meta-learner; its own tensors are the meta-parameters and are
            never modified.
        support_texts (`Sequence[str]`): N*K support texts.
        support_labels (`Sequence[str]`): their labels.
        config (`InnerLoopConfig`): steps, learning rate, adapted layers, clipping.
        label_names (`Sequence[str]`, *optional*): class order (default: order of first
            appearance in ``support_labels``).
        initial_head (`Mapping[str, Tensor]`, *optional*): a precomputed prototype head (used by
            meta-training, which needs it with a graph); computed here when ``None``.
        cache_frozen (`bool`, defaults to True): run the non-adapted lower layers once without
            autograd and only the adapted layers at each step (same result, less work).
        support_features (`FrozenFeatures`, *optional*): the support set's hidden states at a
            layer at or below the first adapted one (from :class:`meta.feature_cache.LowerLayerCache`);
            the texts are then not run through the layers below it again. With
            ``config.label_anchors`` its rows are the support texts followed by the N anchors
            (:func:`meta.model.anchor_texts`).

    Returns:
        `Adaptation`: adapted tensors (head: (N, hidden) and (N,)), support losses and accuracy.

    Raises:
        ValueError: when there are fewer than 2 classes, texts and labels differ in length, or
            ``support_features`` is given with ``adapted_layers == -1``.
    """
    start = time.perf_counter()
    if len(support_texts) != len(support_labels):
        raise ValueError(f"{len(support_texts)} support texts but {len(support_labels)} labels")
    names = tuple(label_names) if label_names is not None else tuple(dict.fromkeys(support_labels))
    if len(set(names)) < 2:
        raise ValueError(f"the support set needs at least 2 distinct labels, got {list(names)}")
    if support_features is not None and config.adapted_layers == -1:
        raise ValueError("support_features cannot be used when every encoder tensor is adapted")
    was_training = model.training
    model.eval()
    try:
        with autocast(model.device):  # bf16 on CUDA, no-op on CPU
            targets = encode_labels(support_labels, names, model.device)  # (N*K,)
            n_support = len(support_texts)
            texts = list(support_texts) + (anchor_texts(names) if config.label_anchors else [])
            base = {name: p.detach() for name, p in model.named_parameters()}
            fast = {
                name: base[name].clone().requires_grad_(True)
                for name in model.adapted_parameter_names(config.adapted_layers)
            }
            # The layers below the adapted ones run once; each step runs only the adapted layers.
            batch: dict[str, Tensor] = {}
            if support_features is not None:
                first_adapted = model.num_layers - config.adapted_layers
                frozen: FrozenFeatures | None = model.advance(base, support_features, first_adapted)
            else:
                batch = model.tokenize(texts)  # (N*K [+ N anchors], tokens)
                frozen = model.frozen_features(batch, config.adapted_layers) if cache_frozen else None
            if initial_head is None:
                with torch.no_grad():
                    z = model.embed_frozen(base, frozen) if frozen is not None else model.embed(base, batch)
                    initial_head = initial_classifier(model, z, targets, len(names), config)
            fast.update({name: t.detach().clone().requires_grad_(True) for name, t in initial_head.items()})

            def support_logits(params: Params) -> Tensor:  # (N*K, N)
                z = model.embed(params, batch) if frozen is None else model.embed_frozen(params, frozen)
                return model.head_logits(params, z[:n_support])  # anchors are not support examples

            losses = []
            for _ in range(config.steps):
                loss = F.cross_entropy(support_logits({**base, **fast}), targets)
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = sgd_step(fast, grads, config.lr, config.grad_clip)
                losses.append(loss.item())
            with torch.no_grad():
                logits = support_logits({**base, **fast})  # (N*K, N)
                losses.append(float(F.cross_entropy(logits, targets)))
                accuracy = float((logits.argmax(-1) == targets).float().mean())
    finally:
        model.train(was_training)
    params = {name: t.detach() for name, t in fast.items()}
    return Adaptation(
        params=params,
        labels=names,
        support_losses=losses,
        support_accuracy=accuracy,
        steps=config.steps,
        seconds=time.perf_counter() - start,
    )


def initial_classifier(
    model: MetaLearner, embeddings: Tensor, targets: Tensor, n_classes: int, config: InnerLoopConfig
) -> Params:
    """The head the inner loop starts from (a pure function of the support embeddings).

    Args:
        model (`MetaLearner`): supplies the meta-learned anchor weight.
        embeddings (`Tensor`): (N*K [+ N], hidden) support embeddings, followed by the N
            label-name anchors when ``config.label_anchors``.
        targets (`Tensor`): (N*K,) class ids.
        n_classes (`int`): N.
        config (`InnerLoopConfig`): which classifier, and whether anchors are used.

    Returns:
        `dict[str, Tensor]`: :func:`meta.model.prototype_head` or :func:`meta.model.matching_head`.
    """
    support = embeddings[: targets.shape[0]]  # (N*K, hidden)
    head = matching_head if config.classifier == "matching" else prototype_head
    if config.label_anchors:
        anchors = embeddings[targets.shape[0] :]  # (N, hidden)
        return head(support, targets, n_classes, anchors, model.label_log_weight.exp())
    return head(support, targets, n_classes)


def is_head_only(params: Mapping[str, Tensor]) -> bool:
    """Whether adapted ``params`` hold only the head, so that the encoder pass is the base
    model's and can be shared between domains."""
    return set(params) <= HEAD_KEYS


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


def predict_proba(
    model: MetaLearner, params: Mapping[str, Tensor], texts: Sequence[str], batch_size: int = 32
) -> Tensor:
    """Class probabilities of ``texts`` under adapted ``params``.

    Texts are tokenised once, sorted by token count and batched so that padding is short
    (bf16 autocast on CUDA); results come back in input order.

    Args:
        model (`MetaLearner`): the base model.
        params (`Mapping[str, Tensor]`): adapted tensors (from :class:`Adaptation`).
        texts (`Sequence[str]`): texts to classify.
        batch_size (`int`, defaults to 32): texts per forward pass.

    Returns:
        `Tensor`: (texts, classes) probabilities on the CPU, rows summing to 1.
    """
    out = _map_sorted(model, texts, batch_size, lambda batch: model.logits(params, batch).float().softmax(-1))
    return out if out is not None else torch.empty(0, num_classes(params))


def embed_texts(model: MetaLearner, texts: Sequence[str], batch_size: int = 32) -> Tensor:
    """Base-model embeddings (texts, hidden) on the CPU, in input order (length-sorted batches)."""
    out = _map_sorted(model, texts, batch_size, lambda batch: model.embed({}, batch))
    return out if out is not None else torch.empty(0, int(model.encoder.config.hidden_size))


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (where it is safe for BERT inference and adaptation), a no-op
    elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
