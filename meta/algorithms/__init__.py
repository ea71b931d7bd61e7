"""The meta-learning methods, one module each, and the registry they register themselves in.

Built-in methods (in this order, which is also the order of ``metasent benchmark``):

- ``fomaml``: first-order MAML (Finn et al. 2017) over LoRA adapters with a matching-network head;
- ``reptile``: Reptile (Nichol et al. 2018);
- ``protonet``: prototypical networks (Snell et al. 2017);
- ``matching``: matching networks (Vinyals et al. 2016);
- ``multitask``: multi-task pre-training (the baseline of Finn et al. 2017);
- ``finetune`` and ``none``: not meta-trained (the pretrained encoder, fine-tuned or head only).

A new method is one module that calls :func:`register` with an :class:`AlgorithmSpec` (see
:mod:`meta.algorithms.registry`); installed distributions can also name it under the entry-point
group ``metasent.algorithms``, which is read when this package is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import CheckpointConfig
from ..feature_cache import LowerLayerCache
from ..model import MetaLearner

# the built-in methods register themselves on import, in this order (names(), the benchmark's order)
# isort: off
from . import fomaml, reptile, protonet, matching, multitask, finetune, none  # noqa: F401

# isort: on
from .multitask import MultitaskHead, multitask_step
from .registry import (
    ENTRY_POINT_GROUP,
    AlgorithmSpec,
    OuterLoop,
    OuterLoopContext,
    OuterStep,
    UnknownAlgorithmError,
    default_inner_loop,
    get,
    load_entry_points,
    meta_trained,
    names,
    register,
    specs,
    unregister,
)
from .reptile import reptile_step


def make_outer_loop(
    model: MetaLearner,
    config: CheckpointConfig,
    optimizer: torch.optim.Optimizer,
    labels: Sequence[str],
    feature_cache: LowerLayerCache | None = None,
) -> OuterLoop:
    """The outer step of ``config.algorithm``, built by its registered spec.

    Args:
        model (`MetaLearner`): the meta-learner.
        config (`CheckpointConfig`): algorithm, inner loop and training settings.
        optimizer (`torch.optim.Optimizer`): over the model's trainable parameters (an algorithm
            may add parameter groups, e.g. the multi-task head's).
        labels (`Sequence[str]`): label names of the source tasks (multi-task head rows).
        feature_cache (`LowerLayerCache`, *optional*): cached frozen lower layers.

    Returns:
        `OuterLoop`: the step function and any extra trained module.

    Raises:
        ValueError: for an unknown algorithm, or one that is not meta-trained (``finetune``,
            ``none``).
    """
    spec = get(config.algorithm)
    if spec.make_outer_loop is None:
        raise ValueError(f"algorithm {spec.name!r} is not meta-trained")
    return spec.make_outer_loop(OuterLoopContext(model, config, optimizer, labels, feature_cache))


__all__ = [
    "ENTRY_POINT_GROUP",
    "AlgorithmSpec",
    "MultitaskHead",
    "OuterLoop",
    "OuterLoopContext",
    "OuterStep",
    "UnknownAlgorithmError",
    "default_inner_loop",
    "get",
    "load_entry_points",
    "make_outer_loop",
    "meta_trained",
    "multitask_step",
    "names",
    "register",
    "reptile_step",
    "specs",
    "unregister",
]

load_entry_points()  # last: a plugin may import this package's names
