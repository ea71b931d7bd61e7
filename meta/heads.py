"""The few-shot heads: a classifier built per task from the support embeddings.

- :class:`PrototypeHead`: a linear head initialised from class prototypes (Proto-MAML,
  Triantafillou et al. 2020, "Meta-Dataset"; prototypes from Snell et al. 2017);
- :class:`MatchingHead`: attention over every support example (Vinyals et al. 2016, "Matching
  Networks for One Shot Learning").

:data:`HEADS` maps ``InnerLoopConfig.classifier`` to the head; a new head is one class here and one
entry in :data:`HEADS` (plus the ``classifier`` ``Literal`` in :mod:`meta.config`). The inner loop
that adapts a head lives in :mod:`meta.inner`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Params

HEAD_PREFIX = "head."
"""Serialisation only: head tensor ``weight`` is stored as ``head.weight`` beside the encoder's names."""

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
