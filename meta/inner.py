"""The inner loop: adaptation of a head and the top encoder layers to one support set (Finn et
al. 2017, "Model-Agnostic Meta-Learning", Algorithm 1, inner update), as the server runs it.

- :func:`inner_loop` is the serving primitive: support texts and labels in, an
  :class:`AdaptedState` out (it serialises to named tensors, :meth:`AdaptedState.to_tensors`);
- it is built from lower-level pieces that meta-training reuses with its own inputs (a head with
  a graph into the meta-parameters, cached lower-layer features; see
  :mod:`meta.algorithms.fomaml`): :func:`support_embedder`, :func:`init_head` and
  :func:`take_inner_steps`, over the pure update maths :func:`sgd_step` and
  :func:`straight_through`.

The base model's tensors are never modified: adapted encoder tensors are passed to
``torch.func.functional_call`` (see :class:`meta.model.MetaLearner`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import InnerLoopConfig
from .heads import HEAD_PREFIX, HEADS, Head, head_from_tensors
from .model import FrozenFeatures, MetaLearner, Params

if TYPE_CHECKING:
    from .estimate import AccuracyEstimate

SupportEmbedder = Callable[[Params], Tensor]
"""``embed(encoder) -> (N*K [+ N], hidden)``: the support set (and label anchors) embedded with the
adapted encoder tensors ``encoder`` over the base ones."""


@dataclass(eq=False)
class AdaptedState:
    """The result of the inner loop on one support set.

    Args:
        head (`Head`): the adapted head (N classes).
        labels (`tuple[str, ...]`): class names; class id ``i`` is ``labels[i]``.
        encoder (`dict[str, Tensor]`): the adapted encoder tensors by parameter name, detached;
            empty when only the head was adapted. Every other tensor is the base model's.
        support_losses (`list[float]`): support cross-entropy before each step and after the last
            (``steps + 1`` values, nats); empty for a state rebuilt by :meth:`from_tensors`.
        support_accuracy (`float`): accuracy of the adapted state on the support set (NaN when
            unknown).
        steps (`int`): SGD steps taken.
        seconds (`float`): wall time of the adaptation.
        support_embeddings (`Tensor`, *optional*): (N*K [+ N anchors], hidden) the support set
            embedded by the adapted encoder, detached, when the inner loop computed it (never
            stored: :meth:`to_tensors` leaves it out).
        estimate (`AccuracyEstimate`, *optional*): the held-out accuracy estimate of
            :func:`estimate_accuracy`, when asked for.
    """

    head: Head
    labels: tuple[str, ...]
    encoder: Params = field(default_factory=dict)
    support_losses: list[float] = field(default_factory=list)
    support_accuracy: float = math.nan
    steps: int = 0
    seconds: float = 0.0
    support_embeddings: Tensor | None = None
    estimate: AccuracyEstimate | None = None

    @property
    def shares_encoder(self) -> bool:
        """True when the head shares the encoder pass (:attr:`Head.shares_encoder`) and no encoder
        tensor is adapted, so states of different domains can share one pass of the base encoder."""
        return self.head.shares_encoder and not self.encoder

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def to_tensors(self) -> Params:
        """Every adapted tensor by its stored name: encoder parameter names as they are, head
        tensors as ``head.<name>`` (``head.weight``/``head.bias`` for :class:`PrototypeHead`,
        ``head.support``/``head.support_labels``/``head.support_bias`` for :class:`MatchingHead`)."""
        return {**self.encoder, **{HEAD_PREFIX + name: t for name, t in self.head.tensors().items()}}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], labels: Sequence[str]) -> AdaptedState:
        """The state :meth:`to_tensors` wrote (domains stored by earlier versions load the same way).

        Args:
            tensors (`Mapping[str, Tensor]`): stored tensors by name.
            labels (`Sequence[str]`): the class names, in class-id order.

        Raises:
            ValueError: when the head tensors match no head, or their class count is not ``len(labels)``.
        """
        head = head_from_tensors({k[len(HEAD_PREFIX) :]: t for k, t in tensors.items() if k.startswith(HEAD_PREFIX)})
        if head.num_classes != len(labels):
            raise ValueError(f"the head has {head.num_classes} classes but {len(labels)} labels were given")
        encoder = {k: t for k, t in tensors.items() if not k.startswith(HEAD_PREFIX)}
        return cls(head=head, labels=tuple(labels), encoder=encoder)


# -- pure inner-loop maths -------------------------------------------------------------------------


def clip_factor(grads: Sequence[Tensor], clip: float | None) -> Tensor | float:
    """The factor ``min(1, clip / ||g||)`` that scales ``grads`` to global L2 norm at most ``clip``
    (1 when ``clip`` is ``None``). A scalar tensor on the gradients' device: computing it never
    waits for the device (no host sync)."""
    if clip is None:
        return 1.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    return torch.clamp(clip / (norm + 1e-12), max=1.0)


def sgd_step(
    tensors: Sequence[Tensor], grads: Sequence[Tensor], lr: float | Sequence[float | Tensor], clip: float | None
) -> list[Tensor]:
    """One SGD update ``theta - lr * g`` with ``g`` clipped to global L2 norm ``clip``; pure.

    Args:
        tensors (`Sequence[Tensor]`): the parameters, in the same order as ``grads``.
        grads (`Sequence[Tensor]`): their gradients.
        lr (`float | Sequence[float | Tensor]`): one learning rate, or one per tensor (Meta-SGD,
            Li et al. 2017; tensors are used by value, detached).
        clip (`float | None`): maximum global gradient norm, ``None`` for no clipping.

    Returns:
        `list[Tensor]`: new leaf tensors that require grad.
    """
    factor = clip_factor(grads, clip)
    lrs = [lr] * len(tensors) if isinstance(lr, (int, float)) else list(lr)
    return [
        (p.detach() - _value(rate) * factor * g.detach()).requires_grad_(True)
        for p, g, rate in zip(tensors, grads, lrs, strict=True)
    ]


def _value(x: float | Tensor) -> float | Tensor:
    return x.detach() if isinstance(x, Tensor) else x


def straight_through(start: Tensor, adapted: Tensor, lr: Tensor | None = None) -> Tensor:
    """The value of ``adapted`` with first-order MAML gradients (Finn et al. 2017, section 5.2).

    Without ``lr``: ``start + stopgrad(adapted - start)``, the gradient of ``start``. With the
    Meta-SGD learning rate ``lr`` (a scalar tensor with a graph, the one the inner loop used,
    Li et al. 2017): ``start + stopgrad(adapted - start) * lr / stopgrad(lr)``, whose gradient
    with respect to ``lr`` is the first-order ``-sum_k g_k . dL/dphi``, because the inner loop
    moved ``start`` by ``adapted - start = -lr * sum_k g_k`` (the clipped support gradients).

    Args:
        start (`Tensor`): the meta-parameter (or the head built from the support set).
        adapted (`Tensor`): the inner loop's result for it, same shape.
        lr (`Tensor`, *optional*): its Meta-SGD learning rate, a scalar.

    Returns:
        `Tensor`: equal to ``adapted`` in value.
    """
    delta = adapted.detach() - start.detach()
    if lr is None:
        return start + delta
    return start + delta * (lr / lr.detach())


def encode_labels(labels: Sequence[str], label_names: Sequence[str], device: torch.device) -> Tensor:
    """Class ids (examples,) of ``labels`` in ``label_names``.

    Raises:
        KeyError: when a label is not in ``label_names``.
    """
    index = {name: i for i, name in enumerate(label_names)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long, device=device)


def anchor_texts(label_names: Sequence[str]) -> list[str]:
    """The texts embedded as label-name anchors: the label names themselves."""
    return [str(name) for name in label_names]


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (where it is safe for BERT inference and adaptation), a no-op
    elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def init_head(
    model: MetaLearner, embeddings: Tensor, targets: Tensor, num_classes: int, config: InnerLoopConfig
) -> Head:
    """The head the inner loop starts from, ``HEADS[config.classifier]`` on the support set (a pure
    function of the embeddings; it keeps their graph, as FOMAML needs).

    Args:
        model (`MetaLearner`): supplies the meta-learned anchor weight ``exp(label_log_weight)``.
        embeddings (`Tensor`): (N*K [+ N], hidden) support embeddings, followed by the N
            label-name anchors when ``config.label_anchors``.
        targets (`Tensor`): (N*K,) class ids.
        num_classes (`int`): N.
        config (`InnerLoopConfig`): which head, and whether anchors are used.

    Returns:
        `Head`: N classes.
    """
    kind = HEADS[config.classifier]
    support = embeddings[: targets.shape[0]]  # (N*K, hidden)
    if config.label_anchors:
        anchors = embeddings[targets.shape[0] :]  # (N, hidden)
        return kind.from_support(support, targets, num_classes, anchors, model.label_log_weight.exp())
    return kind.from_support(support, targets, num_classes)


@contextmanager
def evaluating(model: MetaLearner) -> Iterator[None]:
    """Dropout off while adapting (so the same support set always gives the same state); the
    model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def detached_parameters(model: MetaLearner) -> Params:
    """The model's parameters by name, detached: the base tensors the inner loop starts from."""
    return {name: p.detach() for name, p in model.named_parameters()}


def support_with_anchors(
    support_texts: Sequence[str], label_names: Sequence[str], config: InnerLoopConfig
) -> list[str]:
    """The texts the inner loop embeds: the support texts, then the N label-name anchors when
    ``config.label_anchors`` (:func:`anchor_texts`)."""
    return list(support_texts) + (anchor_texts(label_names) if config.label_anchors else [])


def support_embedder(
    model: MetaLearner,
    base: Params,
    texts: Sequence[str],
    adapted_layers: int,
    cache_frozen: bool = True,
    features: FrozenFeatures | None = None,
) -> SupportEmbedder:
    """``embed(encoder) -> (N*K [+ N], hidden)`` for ``texts`` (support texts, then any anchors).

    The layers below the top ``adapted_layers`` run once, here, without autograd (or come from
    ``features``); each call runs only the adapted layers.

    Args:
        model (`MetaLearner`): the meta-learner.
        base (`Params`): its detached parameters (:func:`detached_parameters`).
        texts (`Sequence[str]`): the texts to embed.
        adapted_layers (`int`): top encoder layers adapted (0: head only, -1: all).
        cache_frozen (`bool`, defaults to True): run the non-adapted lower layers once (same
            result as running them at every call, less work); False runs the whole encoder per call.
        features (`FrozenFeatures`, *optional*): the texts' hidden states at a layer at or below
            the first adapted one (meta-training's cached lower layers); the texts are then not
            run through the layers below it again.

    Raises:
        ValueError: when ``features`` is given with ``adapted_layers == -1``.
    """
    if features is not None and adapted_layers == -1:
        raise ValueError("support_features cannot be used when every encoder tensor is adapted")
    batch: dict[str, Tensor] = {}
    if features is not None:
        frozen: FrozenFeatures | None = model.advance(base, features, model.num_layers - adapted_layers)
    else:
        batch = model.tokenize(texts)  # (N*K [+ N anchors], tokens)
        frozen = model.frozen_features(batch, adapted_layers) if cache_frozen else None

    def embed(encoder: Params) -> Tensor:
        params = {**base, **encoder}
        return model.embed(params, batch) if frozen is None else model.embed_frozen(params, frozen)

    return embed


def take_inner_steps(
    model: MetaLearner,
    base: Params,
    embed: SupportEmbedder,
    targets: Tensor,
    config: InnerLoopConfig,
    start_head: Head,
) -> tuple[Params, Params, list[Tensor]]:
    """``config.steps`` SGD steps (:func:`sgd_step`, learning rate ``config.lr`` or the Meta-SGD
    rates, Li et al. 2017) on the support cross-entropy over the head and the top
    ``config.adapted_layers`` encoder tensors together. A derived head (matching,
    :attr:`meta.heads.Head.derived`) takes no step: it is rebuilt from the support set at each
    step, and the steps adapt the encoder on its leave-one-out loss.

    Args:
        model (`MetaLearner`): the meta-learner (its tensors are not modified).
        base (`Params`): its detached parameters.
        embed (`SupportEmbedder`): from :func:`support_embedder`.
        targets (`Tensor`): (N*K,) class ids of the support texts.
        config (`InnerLoopConfig`): steps, learning rate, adapted layers, clipping, head.
        start_head (`Head`): the head the steps start from (:func:`init_head`); only its values
            are used.

    Returns:
        `(Params, Params, list[Tensor])`: the adapted encoder tensors (empty with no step), the
        adapted head tensors (empty for a derived head), and the support loss before each step
        (scalar tensors, nats; read by the caller, so no host sync per step).
    """
    # with no step the adapted tensors would equal the model's: none is kept, so the state
    # shares the base encoder pass with every other domain
    adapted = model.adapted_parameter_names(config.adapted_layers, config.adapter) if config.steps else []
    encoder = {n: base[n].clone().requires_grad_(True) for n in adapted}
    derived = type(start_head).derived  # matching: the head is the support set, re-embedded
    head = {} if derived else {n: t.detach().clone().requires_grad_(True) for n, t in start_head.tensors().items()}
    lrs = model.inner_lrs([*encoder, *(HEAD_PREFIX + name for name in head)])
    step_lr: float | list[Tensor] = config.lr if lrs is None else [lr.detach() for lr in lrs]
    n_support, num_classes = targets.shape[0], start_head.num_classes

    def fit_logits(encoder: Params, head: Params) -> Tensor:  # (N*K, N); anchors are no examples
        z = embed(encoder)  # (N*K [+ N], hidden)
        current = init_head(model, z, targets, num_classes, config) if derived else start_head.with_tensors(head)
        return current.support_logits(z[:n_support], base["logit_scale"])

    losses = []
    for _ in range(config.steps):
        loss = F.cross_entropy(fit_logits(encoder, head), targets)
        encoder, head = _step(loss, encoder, head, step_lr, config.grad_clip)
        losses.append(loss.detach())
    return encoder, head, losses


def inner_loop(
    model: MetaLearner,
    support_texts: Sequence[str],
    support_labels: Sequence[str],
    config: InnerLoopConfig,
    label_names: Sequence[str] | None = None,
    score_support: bool = True,
) -> AdaptedState:
    """Adapt the head and the top ``config.adapted_layers`` encoder layers (their own tensors, or
    their LoRA adapters with ``config.adapter == "lora"``) to a support set, as the server does.

    The head starts from the support set (:func:`init_head`; with ``config.label_anchors`` each
    label name joins its class as a weighted example), then ``config.steps`` SGD steps
    (:func:`take_inner_steps`) at learning rate ``config.lr`` minimise the support cross-entropy over
    the head and the adapted encoder tensors together. A head made of the support set itself
    (matching, :attr:`meta.heads.Head.derived`) takes no step of its own: the steps adapt the
    encoder tensors on its leave-one-out loss (:meth:`meta.heads.MatchingHead.support_logits`) and
    the head is then rebuilt from the support set embedded by the adapted encoder. Dropout is off,
    so the same support set always gives the same adapted state.

    Args:
        model (`MetaLearner`): the meta-learner; its own tensors are the meta-parameters and are
            never modified.
        support_texts (`Sequence[str]`): N*K support texts.
        support_labels (`Sequence[str]`): their labels.
        config (`InnerLoopConfig`): head, steps, learning rate, adapted layers, clipping.
        label_names (`Sequence[str]`, *optional*): class order (default: order of first
            appearance in ``support_labels``).
        score_support (`bool`, defaults to True): compute the support losses and accuracy of the
            returned state (one more forward pass of the adapted layers, one host sync).

    Returns:
        `AdaptedState`: the adapted head and encoder tensors, support losses and accuracy.

    Raises:
        ValueError: when there are fewer than 2 classes, or texts and labels differ in length.
    """
    start = time.perf_counter()
    names = _class_names(support_texts, support_labels, label_names)
    with evaluating(model), autocast(model.device):  # bf16 on CUDA, no-op on CPU
        targets = encode_labels(support_labels, names, model.device)  # (N*K,)
        base = detached_parameters(model)
        embed = support_embedder(model, base, support_with_anchors(support_texts, names, config), config.adapted_layers)
        with torch.no_grad():
            start_z = embed({})  # (N*K [+ N], hidden) at the meta-parameters
            start_head = init_head(model, start_z, targets, len(names), config)
        encoder, head, losses = take_inner_steps(model, base, embed, targets, config, start_head)
        derived = type(start_head).derived
        final_z = torch.empty(0)  # the support set at the adapted encoder: once, for the head and the score
        if (derived and encoder) or score_support:
            with torch.no_grad():  # (N*K [+ N], hidden); with no step, the start's embeddings
                final_z = embed(encoder) if encoder else start_z
        if derived:
            if encoder:  # the head of the adapted encoder: the support set re-embedded
                start_head = init_head(model, final_z, targets, len(names), config)
            head = start_head.tensors()
        served = start_head.with_tensors({name: t.detach() for name, t in head.items()})
        n_support = len(support_texts)
        figures = _support_figures(served, final_z[:n_support], targets, base, losses) if score_support else None
    return AdaptedState(
        head=served,
        labels=names,
        encoder={name: t.detach() for name, t in encoder.items()},
        support_losses=figures[0] if figures else [],
        support_accuracy=figures[1] if figures else math.nan,
        steps=config.steps,
        seconds=time.perf_counter() - start,
        support_embeddings=final_z.detach() if final_z.numel() else None,
    )


def _support_figures(
    head: Head, support_z: Tensor, targets: Tensor, base: Params, losses: list[Tensor]
) -> tuple[list[float], float]:
    """The support losses (before each step, then of ``head`` as served; nats) and the served
    head's support accuracy, read from the device in one host sync."""
    with torch.no_grad():
        logits = head.logits(support_z, base["logit_scale"])  # (N*K, N), as served
        correct = (logits.argmax(-1) == targets).float().mean()
        figures = torch.stack([*losses, F.cross_entropy(logits, targets), correct]).float().tolist()
    return figures[:-1], figures[-1]


def _class_names(
    support_texts: Sequence[str], support_labels: Sequence[str], label_names: Sequence[str] | None
) -> tuple[str, ...]:
    """The class order: ``label_names``, or the labels in order of first appearance.

    Raises:
        ValueError: when texts and labels differ in length or there are fewer than 2 classes.
    """
    if len(support_texts) != len(support_labels):
        raise ValueError(f"{len(support_texts)} support texts but {len(support_labels)} labels")
    names = tuple(label_names) if label_names is not None else tuple(dict.fromkeys(support_labels))
    if len(set(names)) < 2:
        raise ValueError(f"the support set needs at least 2 distinct labels, got {list(names)}")
    return names


def _step(
    loss: Tensor, encoder: Params, head: Params, lr: float | list[Tensor], clip: float | None
) -> tuple[Params, Params]:
    """One :func:`sgd_step` on the encoder and head tensors together (one clipping norm); ``lr``
    is one rate or one per tensor (encoder tensors, then head tensors)."""
    tensors = [*encoder.values(), *head.values()]
    updated = sgd_step(tensors, torch.autograd.grad(loss, tensors), lr, clip)
    split = len(encoder)
    return dict(zip(encoder, updated[:split], strict=True)), dict(zip(head, updated[split:], strict=True))
