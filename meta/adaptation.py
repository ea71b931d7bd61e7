"""Adaptation: the one home of the inner loop, the few-shot heads and prediction.

Meta-training (:mod:`meta.fomaml`, :mod:`meta.algorithms`), evaluation (:mod:`meta.evaluate`) and
the server all adapt and predict through this module, so what the service does at adaptation time
is exactly what the meta-parameters were trained for (Finn et al. 2017, "Model-Agnostic
Meta-Learning", Algorithm 1, inner update). In the style of learn2learn's ``maml.py``, adaptation
is a small object and its update maths pure functions:

- a :class:`Head` is a classifier built per task from the support embeddings:
  :class:`PrototypeHead` (a linear head initialised from class prototypes, Proto-MAML,
  Triantafillou et al. 2020) or :class:`MatchingHead` (attention over the support set, Vinyals et
  al. 2016), chosen by ``InnerLoopConfig.classifier`` through :data:`HEADS`;
- :func:`inner_loop` adapts a head and the top encoder layers to a support set with the pure
  :func:`sgd_step` and returns an :class:`AdaptedState`, which serialises to named tensors
  (:meth:`AdaptedState.to_tensors`) and back;
- a :class:`Predictor` adapts and classifies on one base model, sharing one base-encoder pass
  between states that adapted no encoder tensor (:meth:`Predictor.predict_many`).

The base model's tensors are never modified: adapted encoder tensors are passed to
``torch.func.functional_call`` (see :class:`meta.model.MetaLearner`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import InnerLoopConfig
from .model import FrozenFeatures, MetaLearner, Params

HEAD_PREFIX = "head."
"""Serialisation only: head tensor ``weight`` is stored as ``head.weight`` beside the encoder's names."""
SHARED_ENCODER_KEY = "shared-encoder"
"""The micro-batch key of every state that adapted no encoder tensor (see :meth:`Predictor.batch_key`)."""

H = TypeVar("H", bound="Head")


class Head(ABC):
    """A few-shot classifier over unit-norm embeddings, built per task from its support set.

    Subclasses are dataclasses whose fields are the head's tensors (fields with a default are
    optional); :meth:`tensors` and :meth:`from_tensors` name them after the fields.
    """

    shares_encoder: ClassVar[bool] = True
    """Whether the head reads only the pooled embeddings of the encoder, so that states with this
    head and no adapted encoder tensor can share one base-encoder pass across domains
    (:attr:`AdaptedState.shares_encoder`); a head that adapts or reads inside the encoder sets
    False."""
    derived: ClassVar[bool] = False
    """Whether the head's tensors are the support set's embeddings themselves (matching): the
    inner loop then steps on the encoder only and rebuilds the head from the adapted encoder
    (:func:`init_head`) instead of stepping on the head's tensors."""

    @classmethod
    @abstractmethod
    def from_support(
        cls: type[H],
        embeddings: Tensor,
        targets: Tensor,
        num_classes: int,
        anchors: Tensor | None = None,
        anchor_weight: Tensor | None = None,
    ) -> H:
        """Initialise the head from a support set.

        Args:
            embeddings (`Tensor`): (N*K, hidden) support embeddings, unit norm.
            targets (`Tensor`): (N*K,) class ids in ``[0, num_classes)``.
            num_classes (`int`): number of classes N.
            anchors (`Tensor`, *optional*): (N, hidden) embedded label names.
            anchor_weight (`Tensor`, *optional*): scalar weight ``w`` of each anchor (default 1).

        Raises:
            ValueError: when a class has no support example.
        """

    @abstractmethod
    def logits(self, embeddings: Tensor, logit_scale: Tensor) -> Tensor:
        """Class logits of (B, hidden) unit-norm embeddings under log-temperature ``logit_scale``
        (a scalar, the model's meta-parameter); returns (B, N)."""

    def support_logits(self, support: Tensor, logit_scale: Tensor) -> Tensor:
        """The logits the inner loop minimises the cross-entropy of, for the (N*K, hidden) support
        embeddings the head was built from; returns (N*K, N). The head's own :meth:`logits` by
        default (Proto-MAML)."""
        return self.logits(support, logit_scale)

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes N."""

    def tensors(self) -> Params:
        """The head's tensors by name (what the inner loop differentiates and the store keeps)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {name: t for name, t in values.items() if t is not None}

    @classmethod
    def from_tensors(cls: type[H], tensors: Mapping[str, Tensor]) -> H:
        """The head with these tensors (names as in :meth:`tensors`).

        Raises:
            TypeError: when a name is missing or unknown.
        """
        return cls(**tensors)

    def with_tensors(self: H, tensors: Mapping[str, Tensor]) -> H:
        """A head of the same kind with ``tensors`` (e.g. after an SGD step)."""
        return type(self).from_tensors(tensors)

    @classmethod
    def accepts(cls, names: frozenset[str]) -> bool:
        """Whether ``names`` are this head's required tensor names plus any optional ones."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        return required <= names <= {f.name for f in fields}


def _one_hot(targets: Tensor, num_classes: int) -> Tensor:
    one_hot = F.one_hot(targets, num_classes).float()  # (N*K, N)
    if bool((one_hot.sum(0) == 0).any()):
        raise ValueError("every class needs at least one support example")
    return one_hot


@dataclass(frozen=True, eq=False)
class PrototypeHead(Head):
    """A linear head initialised from class prototypes (Proto-MAML, Triantafillou et al. 2020,
    "Meta-Dataset"): ``W_c = 2 p_c``, ``b_c = -||p_c||^2``, so that the logits equal the negative
    squared Euclidean distance to each prototype up to a per-example constant (Snell et al. 2017,
    "Prototypical Networks"). Logits are ``exp(logit_scale) * (z @ W.T + b)``.

    Args:
        weight (`Tensor`): (N, hidden).
        bias (`Tensor`): (N,).
    """

    weight: Tensor
    bias: Tensor

    @classmethod
    def from_support(
        cls,
        embeddings: Tensor,
        targets: Tensor,
        num_classes: int,
        anchors: Tensor | None = None,
        anchor_weight: Tensor | None = None,
    ) -> PrototypeHead:
        """Prototypes of the support set. With ``anchors`` each prototype is the weighted mean
        ``p_c = (sum_i z_i + w a_c) / (n_c + w)``: the label name counts as ``w`` support examples.
        Arguments as :meth:`Head.from_support`; the head is fp32 (also under autocast)."""
        embeddings = embeddings.float()
        one_hot = _one_hot(targets, num_classes)  # (N*K, N)
        counts = one_hot.sum(0)  # (N,)
        sums = one_hot.T @ embeddings  # (N, hidden)
        if anchors is not None:
            weight = anchor_weight.float() if anchor_weight is not None else torch.ones((), device=sums.device)
            sums = sums + weight * anchors.float()
            counts = counts + weight
        prototypes = sums / counts.unsqueeze(1)  # (N, hidden)
        return cls(weight=2 * prototypes, bias=-(prototypes**2).sum(1))

    def logits(self, embeddings: Tensor, logit_scale: Tensor) -> Tensor:
        return logit_scale.exp() * (embeddings @ self.weight.T + self.bias)

    @property
    def num_classes(self) -> int:
        return int(self.bias.shape[0])


@dataclass(frozen=True, eq=False)
class MatchingHead(Head):
    """The matching-network classifier (Vinyals et al. 2016, "Matching Networks for One Shot
    Learning"): the log of the attention-weighted label distribution
    ``softmax(exp(logit_scale) * cos(z, s) + b) @ Y`` over the support rows ``s``.

    Args:
        support (`Tensor`): (M, hidden) unit-norm support embeddings (M = N*K, + N with anchors).
        support_labels (`Tensor`): (M, N) one-hot labels.
        support_bias (`Tensor`, *optional*): (M,) attention-logit offsets: 0 for support
            examples, ``log w`` for label-name anchors.
    """

    derived: ClassVar[bool] = True

    support: Tensor
    support_labels: Tensor
    support_bias: Tensor | None = None

    @classmethod
    def from_support(
        cls,
        embeddings: Tensor,
        targets: Tensor,
        num_classes: int,
        anchors: Tensor | None = None,
        anchor_weight: Tensor | None = None,
    ) -> MatchingHead:
        """The support set itself. With ``anchors`` each label name is one more row of its class
        whose attention weight is multiplied by ``anchor_weight`` (``log w`` added to its
        attention logit). Arguments as :meth:`Head.from_support`."""
        one_hot = _one_hot(targets, num_classes)  # (N*K, N)
        if anchors is None:
            return cls(support=embeddings.float(), support_labels=one_hot)
        weight = anchor_weight.float() if anchor_weight is not None else torch.ones((), device=one_hot.device)
        bias = torch.cat([torch.zeros(len(targets), device=one_hot.device), weight.log().expand(num_classes)])
        return cls(
            support=torch.cat([embeddings.float(), anchors.float()]),  # (N*K + N, hidden)
            support_labels=torch.cat([one_hot, torch.eye(num_classes, device=one_hot.device)]),
            support_bias=bias,  # (N*K + N,)
        )

    def logits(self, embeddings: Tensor, logit_scale: Tensor) -> Tensor:
        return self._attend(self._scores(embeddings, logit_scale))

    def support_logits(self, support: Tensor, logit_scale: Tensor) -> Tensor:
        """Leave-one-out: support example ``i`` attends to every other support row (and the
        anchors), never to itself, so the loss measures how well the support set classifies its
        own examples (a self-match would make it zero). Returns (N*K, N)."""
        scores = self._scores(support, logit_scale)  # (N*K, M)
        rows = torch.arange(support.shape[0], device=scores.device)
        return self._attend(scores.index_put((rows, rows), scores.new_tensor(float("-inf"))))

    def _scores(self, embeddings: Tensor, logit_scale: Tensor) -> Tensor:  # (B, M) attention logits
        support = self.support.to(embeddings.dtype)  # (M, hidden)
        scores = (logit_scale.exp() * (embeddings @ support.T)).float()  # (B, M)
        return scores if self.support_bias is None else scores + self.support_bias.float()

    def _attend(self, scores: Tensor) -> Tensor:  # (B, M) -> (B, N) log label distribution
        return (scores.softmax(-1) @ self.support_labels.float()).clamp_min(1e-8).log()

    @property
    def num_classes(self) -> int:
        return int(self.support_labels.shape[1])


HEADS: dict[str, type[Head]] = {"prototype": PrototypeHead, "matching": MatchingHead}
"""Heads by ``InnerLoopConfig.classifier``."""


def head_from_tensors(tensors: Mapping[str, Tensor]) -> Head:
    """The head of :data:`HEADS` whose tensor names are ``tensors``' (names without the prefix).

    Raises:
        ValueError: when no head (or more than one) has these tensor names.
    """
    names = frozenset(tensors)
    kinds = [kind for kind in HEADS.values() if kind.accepts(names)]
    if len(kinds) != 1:
        raise ValueError(f"no head has exactly the tensors {sorted(names)}")
    return kinds[0].from_tensors(tensors)


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


def inner_loop(
    model: MetaLearner,
    support_texts: Sequence[str],
    support_labels: Sequence[str],
    config: InnerLoopConfig,
    label_names: Sequence[str] | None = None,
    initial_head: Head | None = None,
    cache_frozen: bool = True,
    support_features: FrozenFeatures | None = None,
    score_support: bool = True,
    rebuild_head: bool = True,
) -> AdaptedState:
    """Adapt the head and the top ``config.adapted_layers`` encoder layers (their own tensors, or
    their LoRA adapters with ``config.adapter == "lora"``) to a support set.

    The head starts from the support set (:func:`init_head`; with ``config.label_anchors`` each
    label name joins its class as a weighted example), then ``config.steps`` SGD steps
    (:func:`sgd_step`) at learning rate ``config.lr`` minimise the support cross-entropy over the
    head and the adapted encoder tensors together. A head made of the support set itself
    (matching, :attr:`Head.derived`) takes no step of its own: the steps adapt the encoder tensors
    on its leave-one-out loss (:meth:`MatchingHead.support_logits`) and the head is then rebuilt
    from the support set embedded by the adapted encoder. Dropout is off (the model is used in eval
    mode), so the same support set always gives the same adapted state.

    Args:
        model (`MetaLearner`): the meta-learner; its own tensors are the meta-parameters and are
            never modified.
        support_texts (`Sequence[str]`): N*K support texts.
        support_labels (`Sequence[str]`): their labels.
        config (`InnerLoopConfig`): head, steps, learning rate, adapted layers, clipping.
        label_names (`Sequence[str]`, *optional*): class order (default: order of first
            appearance in ``support_labels``).
        initial_head (`Head`, *optional*): the starting head (meta-training builds it with a
            graph into the meta-parameters; only its values are used here); computed when ``None``.
        cache_frozen (`bool`, defaults to True): run the non-adapted lower layers once without
            autograd and only the adapted layers at each step (same result, less work).
        support_features (`FrozenFeatures`, *optional*): the support set's hidden states at a
            layer at or below the first adapted one (from :class:`meta.feature_cache.LowerLayerCache`);
            the texts are then not run through the layers below it again. With
            ``config.label_anchors`` its rows are the support texts followed by the N anchors
            (:func:`anchor_texts`).
        score_support (`bool`, defaults to True): compute the support losses and accuracy of the
            returned state (one more forward pass of the adapted layers, one host sync).
        rebuild_head (`bool`, defaults to True): rebuild a derived (matching) head from the support
            set at the adapted encoder. Meta-training passes False: its query loss rebuilds the head
            with a graph into the meta-parameters, so the returned head is then the starting one.

    Returns:
        `AdaptedState`: the adapted head and encoder tensors, support losses and accuracy.

    Raises:
        ValueError: when there are fewer than 2 classes, texts and labels differ in length, or
            ``support_features`` is given with ``adapted_layers == -1``.
    """
    start = time.perf_counter()
    names = _class_names(support_texts, support_labels, label_names)
    if support_features is not None and config.adapted_layers == -1:
        raise ValueError("support_features cannot be used when every encoder tensor is adapted")
    was_training = model.training
    model.eval()
    try:
        with autocast(model.device):  # bf16 on CUDA, no-op on CPU
            targets = encode_labels(support_labels, names, model.device)  # (N*K,)
            texts = list(support_texts) + (anchor_texts(names) if config.label_anchors else [])
            base = {name: p.detach() for name, p in model.named_parameters()}
            embed = _support_embedder(model, base, texts, config, cache_frozen, support_features)
            start_z: Tensor | None = None  # (N*K [+ N], hidden) at the meta-parameters, when computed here
            if initial_head is None:
                with torch.no_grad():
                    start_z = embed({})
                    initial_head = init_head(model, start_z, targets, len(names), config)
            start_head = initial_head
            # with no step the adapted tensors would equal the model's: none is kept, so the state
            # shares the base encoder pass with every other domain
            adapted = model.adapted_parameter_names(config.adapted_layers, config.adapter) if config.steps else []
            encoder = {n: base[n].clone().requires_grad_(True) for n in adapted}
            derived = type(start_head).derived  # matching: the head is the support set, re-embedded
            head = (
                {} if derived else {n: t.detach().clone().requires_grad_(True) for n, t in start_head.tensors().items()}
            )
            lrs = model.inner_lrs([*encoder, *(HEAD_PREFIX + name for name in head)])
            step_lr: float | list[Tensor] = config.lr if lrs is None else [lr.detach() for lr in lrs]
            n_support = len(support_texts)

            def fit_logits(encoder: Params, head: Params) -> Tensor:  # (N*K, N); anchors are no examples
                z = embed(encoder)  # (N*K [+ N], hidden)
                current = init_head(model, z, targets, len(names), config) if derived else start_head.with_tensors(head)
                return current.support_logits(z[:n_support], base["logit_scale"])

            losses = []  # scalar tensors, read once at the end: no host sync per step
            for _ in range(config.steps):
                loss = F.cross_entropy(fit_logits(encoder, head), targets)
                encoder, head = _step(loss, encoder, head, step_lr, config.grad_clip)
                losses.append(loss.detach())
            final_z = torch.empty(0)  # the support set at the adapted encoder: once, for the head and the score
            if (derived and encoder and rebuild_head) or score_support:
                with torch.no_grad():  # (N*K [+ N], hidden); with no step, the start's embeddings
                    final_z = start_z if start_z is not None and not encoder else embed(encoder)
            if derived:
                if encoder and rebuild_head:  # the head of the adapted encoder: the support set re-embedded
                    start_head = init_head(model, final_z, targets, len(names), config)
                head = start_head.tensors()
            losses_list, accuracy = [], math.nan
            if score_support:
                with torch.no_grad():
                    served = start_head.with_tensors(head)
                    logits = served.logits(final_z[:n_support], base["logit_scale"])  # (N*K, N), as served
                    losses.append(F.cross_entropy(logits, targets))
                    correct = (logits.argmax(-1) == targets).float().mean()
                    figures = torch.stack([*losses, correct]).float().tolist()  # the one host sync
                losses_list, accuracy = figures[:-1], figures[-1]
    finally:
        model.train(was_training)
    return AdaptedState(
        head=start_head.with_tensors({name: t.detach() for name, t in head.items()}),
        labels=names,
        encoder={name: t.detach() for name, t in encoder.items()},
        support_losses=losses_list,
        support_accuracy=accuracy,
        steps=config.steps,
        seconds=time.perf_counter() - start,
        support_embeddings=final_z.detach() if final_z.numel() else None,
    )


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


def _support_embedder(
    model: MetaLearner,
    base: Params,
    texts: Sequence[str],
    config: InnerLoopConfig,
    cache_frozen: bool,
    support_features: FrozenFeatures | None,
) -> Callable[[Params], Tensor]:
    """``embed(encoder) -> (N*K [+ N], hidden)``: the support embeddings with the adapted encoder
    tensors ``encoder`` over the base ones. The layers below the adapted ones run once, here (or
    come from ``support_features``); each call runs only the adapted layers."""
    batch: dict[str, Tensor] = {}
    if support_features is not None:
        first_adapted = model.num_layers - config.adapted_layers
        frozen: FrozenFeatures | None = model.advance(base, support_features, first_adapted)
    else:
        batch = model.tokenize(texts)  # (N*K [+ N anchors], tokens)
        frozen = model.frozen_features(batch, config.adapted_layers) if cache_frozen else None

    def embed(encoder: Params) -> Tensor:
        params = {**base, **encoder}
        return model.embed(params, batch) if frozen is None else model.embed_frozen(params, frozen)

    return embed


def _step(
    loss: Tensor, encoder: Params, head: Params, lr: float | list[Tensor], clip: float | None
) -> tuple[Params, Params]:
    """One :func:`sgd_step` on the encoder and head tensors together (one clipping norm); ``lr``
    is one rate or one per tensor (encoder tensors, then head tensors)."""
    tensors = [*encoder.values(), *head.values()]
    updated = sgd_step(tensors, torch.autograd.grad(loss, tensors), lr, clip)
    split = len(encoder)
    return dict(zip(encoder, updated[:split], strict=True)), dict(zip(head, updated[split:], strict=True))


# -- held-out accuracy estimate --------------------------------------------------------------------

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


# -- prediction ------------------------------------------------------------------------------------


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
