"""The algorithm registry: one :class:`AlgorithmSpec` per method, registered by its own module.

Everything that depends on the method reads the registry: the inner loop a checkpoint is trained
and served with (:func:`default_inner_loop`, :func:`meta.resolve.resolve_inner_loop`), the outer step of meta-training
(:func:`meta.algorithms.make_outer_loop`), which algorithms need a meta-trained checkpoint
(:func:`meta.checkpoint.load_model`), the names a checkpoint may record (checked by
:func:`meta.checkpoint.load_checkpoint`), ``metasent train``'s choices and help, and the methods
of ``metasent benchmark``.

A new method is one module that builds a spec and calls :func:`register` when imported::

    from metasent.meta.algorithms import AlgorithmSpec, OuterLoop, register
    from metasent.meta.config import InnerLoopConfig

    def make_outer_loop(context):
        def step(episodes):
            ...  # one outer update; returns (mean loss in nats, mean accuracy)
        return OuterLoop(step)

    register(AlgorithmSpec(
        name="mymethod",
        description="My method (Author et al. 2024): what its outer step does",
        default_inner_loop=lambda: InnerLoopConfig(steps=3),
        make_outer_loop=make_outer_loop,
    ))

Import the module before the registry is used (``import mypackage.mymethod``), or expose it as
an entry point of the group ``metasent.algorithms`` (:data:`ENTRY_POINT_GROUP`) so that an
installed distribution is found without an import.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from metasent.data.episodes import Episode

from ..config import CheckpointConfig, InnerLoopConfig, TrainingArguments
from ..feature_cache import LowerLayerCache
from ..model import MetaLearner

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "metasent.algorithms"
"""Entry-point group of third-party algorithms: each entry point names a module that registers
its algorithm when imported, or an :class:`AlgorithmSpec`."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

OuterStep = Callable[[Sequence[Episode]], tuple[float, float]]
"""One outer update from a meta-batch of episodes; returns the mean loss (nats) and accuracy."""


@dataclass
class OuterLoop:
    """The outer step of ``config.algorithm`` and the extra modules it trains.

    Args:
        step (`OuterStep`): one update from a meta-batch.
        extra (`nn.Module | None`): trained alongside the model but not saved in the checkpoint
            (the multi-task head), or ``None``.
    """

    step: OuterStep
    extra: nn.Module | None = None


@dataclass(frozen=True)
class OuterLoopContext:
    """What an algorithm's outer loop is built from (see :attr:`AlgorithmSpec.make_outer_loop`).

    Args:
        model (`MetaLearner`): the meta-learner, trained in place.
        config (`CheckpointConfig`): algorithm, inner loop (``config.inner_loop``, the one the
            server will run) and training settings (``config.training``).
        optimizer (`torch.optim.Optimizer`): AdamW over the model's trainable parameters, with the
            learning-rate schedule of ``config.training``; an algorithm may add parameter groups.
        labels (`Sequence[str]`): label names of the source tasks.
        feature_cache (`LowerLayerCache`, *optional*): the cached outputs of frozen lower layers
            (``training.frozen_layers > 0``).
    """

    model: MetaLearner
    config: CheckpointConfig
    optimizer: torch.optim.Optimizer
    labels: Sequence[str]
    feature_cache: LowerLayerCache | None = None

    @property
    def grad_clip(self) -> float | None:
        """Global L2 norm the outer gradient is clipped to (``None``: no clipping)."""
        return self.config.training.grad_clip if self.config.training is not None else None


@dataclass(frozen=True)
class AlgorithmSpec:
    """One method: how its meta-parameters are learned and how it adapts.

    Args:
        name (`str`): the name checkpoints record and ``metasent train --algorithm`` takes
            (lower-case letters, digits and ``_``).
        description (`str`): one line for ``--help``: what the method does and the paper it
            comes from.
        default_inner_loop (`Callable[[], InnerLoopConfig]`): builds the inner loop the method is
            trained and served with (a fresh object on every call).
        make_outer_loop (`Callable[[OuterLoopContext], OuterLoop]`, *optional*): builds the outer
            step of meta-training; ``None`` for a method that is not meta-trained (the pretrained
            encoder is used as it is, with ``default_inner_loop``).
        training_defaults (`Mapping[str, Any]`, *optional*): defaults of
            :class:`meta.config.TrainingArguments` fields for this method, applied when the user
            does not set the field (e.g. ``{"label_anchors": True, "query_sampling": "natural"}``).
        distributed (`bool`, defaults to False): whether the outer step averages its update over
            the ranks of a torchrun launch (by calling
            :func:`metasent.meta.distributed.average_gradients` between ``backward`` and the
            optimiser step, as the built-in methods do); a method without it is refused by a
            distributed ``metasent train`` rather than letting the ranks drift apart.
    """

    name: str
    description: str
    default_inner_loop: Callable[[], InnerLoopConfig] = InnerLoopConfig
    make_outer_loop: Callable[[OuterLoopContext], OuterLoop] | None = None
    training_defaults: Mapping[str, Any] = field(default_factory=dict)
    distributed: bool = False

    @property
    def meta_trained(self) -> bool:
        """Whether the method has an outer loop (otherwise it needs no meta-training run)."""
        return self.make_outer_loop is not None


class UnknownAlgorithmError(ValueError, KeyError):
    """No algorithm of that name is registered (a ``ValueError`` and a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec, *, replace: bool = False) -> AlgorithmSpec:
    """Add ``spec`` to the registry (in the order of registration).

    Args:
        spec (`AlgorithmSpec`): the method.
        replace (`bool`, defaults to False): allow replacing a registered method of that name.

    Returns:
        `AlgorithmSpec`: ``spec``, so that a module can keep it (``SPEC = register(...)``).

    Raises:
        ValueError: for a malformed name, a name already registered (without ``replace``), or a
            ``training_defaults`` key that is not a training argument.
        TypeError: when ``default_inner_loop()`` does not build an ``InnerLoopConfig``.
    """
    if not _NAME.match(spec.name):
        raise ValueError(f"algorithm name {spec.name!r} must match {_NAME.pattern}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {spec.name!r} is already registered")
    unknown = sorted(set(spec.training_defaults) - set(TrainingArguments.model_fields))
    if unknown:
        raise ValueError(f"{spec.name}: training_defaults {unknown} are not training arguments")
    if not isinstance(spec.default_inner_loop(), InnerLoopConfig):
        raise TypeError(f"{spec.name}: default_inner_loop() must return an InnerLoopConfig")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> AlgorithmSpec:
    """Remove and return the method ``name`` (for tests and plugins that replace a method)."""
    spec = get(name)
    del _REGISTRY[name]
    return spec


def get(name: str) -> AlgorithmSpec:
    """The registered method ``name``.

    Raises:
        UnknownAlgorithmError: (a ``ValueError`` and a ``KeyError``) naming the known methods.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; choose from {', '.join(_REGISTRY)}") from None


def default_inner_loop(name: str) -> InnerLoopConfig:
    """The inner loop the method ``name`` is trained and served with (a fresh object): 3 Meta-SGD
    steps on the top 2 layers' LoRA adapters under a matching head for ``fomaml``; head only with 5
    SGD steps at 0.05 for ``multitask`` and ``none``; the top 2 layers too for ``reptile``; no step
    for ``protonet`` and ``matching``; every tensor, 10 steps at 0.02, for ``finetune``. (Without
    the spec's ``training_defaults``: :func:`meta.resolve.resolve_inner_loop` applies those.)

    Raises:
        UnknownAlgorithmError: (a ``ValueError``) naming the registered algorithms.
    """
    return get(name).default_inner_loop()


def names() -> tuple[str, ...]:
    """Every registered method, in the order of registration."""
    return tuple(_REGISTRY)


def meta_trained() -> tuple[str, ...]:
    """The registered methods that have an outer loop."""
    return tuple(name for name, spec in _REGISTRY.items() if spec.meta_trained)


def specs() -> Mapping[str, AlgorithmSpec]:
    """A read-only view of the registry, by name."""
    return MappingProxyType(_REGISTRY)


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import the third-party algorithms installed under the entry-point group ``group``.

    An entry point names a module that registers its method when imported, or an
    :class:`AlgorithmSpec` (registered here). One that fails to load is logged and skipped, so a
    broken plugin never stops the built-in methods from working.

    Returns:
        `list[str]`: the names of the entry points loaded.
    """
    loaded = []
    for point in entry_points(group=group):
        try:
            target = point.load()
            if isinstance(target, AlgorithmSpec) and _REGISTRY.get(target.name) is not target:
                register(target)
        except Exception:  # a plugin's bug must not break the CLI or the server
            logger.exception("could not load algorithm entry point %s (%s)", point.name, point.value)
            continue
        loaded.append(point.name)
    return loaded
