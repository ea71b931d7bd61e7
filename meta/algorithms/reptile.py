"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
Algorithm 2): the meta-parameters move toward the parameters the inner loop reached.

Reptile moves only what the inner loop adapts, so its default inner loop adapts the top 2 encoder
layers besides the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metasent.data.episodes import Episode

from ..config import InnerLoopConfig
from ..distributed import average_gradients
from ..inner import inner_loop
from ..model import MetaLearner
from .common import clamp_meta_parameters
from .registry import AlgorithmSpec, OuterLoop, OuterLoopContext, register


def reptile_step(
    model: MetaLearner,
    episodes: Sequence[Episode],
    inner_config: InnerLoopConfig,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
) -> tuple[float, float]:
    """One Reptile outer update (batched version, Nichol et al. 2018, Algorithm 2).

    For each episode the inner loop (:func:`meta.inner.inner_loop`) runs on all of the
    episode's examples (support and query: Reptile has no query loss); the outer "gradient" of
    each adapted encoder tensor is ``theta - phi`` averaged over the meta-batch, applied by the
    optimizer (the Adam form of the Reptile step used in the paper's experiments; in a
    distributed run averaged over every rank's episodes). Tensors the
    inner loop does not adapt, the head (rebuilt from prototypes on every task) and the logit
    scale are left unchanged, so Reptile needs ``inner_config.adapted_layers != 0``.

    Args:
        model (`MetaLearner`): the meta-learner, updated in place.
        episodes (`Sequence[Episode]`): the meta-batch.
        inner_config (`InnerLoopConfig`): the inner loop.
        optimizer (`torch.optim.Optimizer`): over the model's parameters.
        grad_clip (`float`, *optional*): global L2 norm the averaged ``theta - phi`` is clipped to.

    Returns:
        `(float, float)`: mean support loss after adaptation (nats) and mean support accuracy.

    Raises:
        ValueError: when the inner loop adapts no encoder tensor.
    """
    if inner_config.adapted_layers == 0:
        raise ValueError("Reptile moves only adapted tensors: use adapted_layers > 0 or -1")
    optimizer.zero_grad(set_to_none=True)
    deltas: dict[str, Tensor] = {}
    losses, accuracies = [], []
    for episode in episodes:
        examples = list(episode.support) + list(episode.query)
        state = inner_loop(
            model, [ex.text for ex in examples], [ex.label for ex in examples], inner_config, episode.labels
        )
        for name, phi in state.encoder.items():  # the head is rebuilt on every task: not moved
            delta = (model.get_parameter(name).detach() - phi) / len(episodes)  # theta - phi
            deltas[name] = deltas[name] + delta if name in deltas else delta
        losses.append(state.support_losses[-1])
        accuracies.append(state.support_accuracy)
    for name, delta in deltas.items():
        parameter = model.get_parameter(name)
        parameter.grad = delta.to(parameter.dtype)
    # theta - phi averaged over every rank's episodes (no-op in one process)
    average_gradients([model.get_parameter(n) for n in deltas], len(episodes))
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([model.get_parameter(n) for n in deltas], grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def make_outer_loop(context: OuterLoopContext) -> OuterLoop:
    """The Reptile outer step (:func:`reptile_step`) with the context's inner loop."""
    return OuterLoop(
        lambda episodes: reptile_step(
            context.model, episodes, context.config.inner_loop, context.optimizer, context.grad_clip
        )
    )


SPEC = register(
    AlgorithmSpec(
        name="reptile",
        description="Reptile (Nichol et al. 2018): the meta-parameters move toward the parameters the inner "
        "loop reached; the top 2 layers and the head adapted",
        default_inner_loop=lambda: InnerLoopConfig(adapted_layers=2),
        make_outer_loop=make_outer_loop,
        distributed=True,
    )
)
