"""Outer-loop updates of the methods besides first-order MAML, and the switch between them.

- Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
  Algorithm 2): the meta-parameters move toward the parameters the inner loop reached.
- Multi-task pre-training (the classic baseline of Finn et al. 2017, section 5.1): one encoder
  and one head trained on every source task by plain supervised learning; at adaptation time the
  same inner loop as the other methods fine-tunes on the support set.
- Prototypical networks (Snell et al. 2017) and matching networks (Vinyals et al. 2016) use the
  first-order MAML query loss with no inner step (:func:`meta.fomaml.fomaml_step`), so their
  outer step is the episodic metric-learning loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metasent.data.episodes import Episode

from .adaptation import autocast, encode_labels, inner_loop
from .config import CheckpointConfig, InnerLoopConfig
from .feature_cache import LowerLayerCache
from .fomaml import clamp_meta_parameters, fomaml_step
from .model import MetaLearner

OuterStep = Callable[[Sequence[Episode]], tuple[float, float]]
"""One outer update from a meta-batch of episodes; returns the mean loss (nats) and accuracy."""


def reptile_step(
    model: MetaLearner,
    episodes: Sequence[Episode],
    inner_config: InnerLoopConfig,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
) -> tuple[float, float]:
    """One Reptile outer update (batched version, Nichol et al. 2018, Algorithm 2).

    For each episode the inner loop (:func:`meta.adaptation.inner_loop`) runs on all of the
    episode's examples (support and query: Reptile has no query loss); the outer "gradient" of
    each adapted encoder tensor is ``theta - phi`` averaged over the meta-batch, applied by the
    optimizer (the Adam form of the Reptile step used in the paper's experiments). Tensors the
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
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([model.get_parameter(n) for n in deltas], grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


class MultitaskHead(nn.Module):
    """The shared linear head of multi-task pre-training: one row per label name seen in the
    source tasks (e.g. ``negative``/``positive``), on the model's unit-norm embeddings.

    Args:
        labels (`Sequence[str]`): every label name of the source tasks.
        hidden (`int`): embedding size.
    """

    def __init__(self, labels: Sequence[str], hidden: int) -> None:
        super().__init__()
        self.labels = tuple(sorted(set(labels)))
        self.weight = nn.Parameter(torch.randn(len(self.labels), hidden) * 0.02)  # (labels, hidden)
        self.bias = nn.Parameter(torch.zeros(len(self.labels)))  # (labels,)

    def forward(self, embeddings: Tensor) -> Tensor:
        """(batch, hidden) -> (batch, labels) logits before the model's temperature."""
        return embeddings @ self.weight.T + self.bias


def multitask_step(
    model: MetaLearner,
    head: MultitaskHead,
    episodes: Sequence[Episode],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
) -> tuple[float, float]:
    """One supervised update on every example of a batch of source-task episodes (cross-entropy
    of ``exp(logit_scale) * head(z)`` against the examples' own labels).

    Args:
        model (`MetaLearner`): the encoder, updated in place.
        head (`MultitaskHead`): the shared head, updated in place (the optimizer must hold it).
        episodes (`Sequence[Episode]`): where the examples come from (support and query alike).
        optimizer (`torch.optim.Optimizer`): over the model's and the head's parameters.
        grad_clip (`float`, *optional*): global L2 gradient norm.

    Returns:
        `(float, float)`: the mean cross-entropy (nats) and accuracy before the update.
    """
    optimizer.zero_grad(set_to_none=True)
    examples = [ex for episode in episodes for ex in (*episode.support, *episode.query)]
    with autocast(model.device):
        targets = encode_labels([ex.label for ex in examples], head.labels, model.device)  # (batch,)
        z = model(**model.tokenize([ex.text for ex in examples]))  # (batch, hidden)
        logits = model.logit_scale.exp() * head(z.float())  # (batch, labels)
        loss = F.cross_entropy(logits, targets)
    loss.backward()
    if grad_clip is not None:
        parameters = [p for p in (*model.parameters(), *head.parameters()) if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    return loss.item(), float((logits.argmax(-1) == targets).float().mean())


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


def make_outer_loop(
    model: MetaLearner,
    config: CheckpointConfig,
    optimizer: torch.optim.Optimizer,
    labels: Sequence[str],
    feature_cache: LowerLayerCache | None = None,
) -> OuterLoop:
    """The outer step of ``config.algorithm``.

    Args:
        model (`MetaLearner`): the meta-learner.
        config (`CheckpointConfig`): algorithm, inner loop and training settings.
        optimizer (`torch.optim.Optimizer`): over the model's trainable parameters (the
            multi-task head's parameters are added to it here).
        labels (`Sequence[str]`): label names of the source tasks (multi-task head rows).
        feature_cache (`LowerLayerCache`, *optional*): cached frozen lower layers (FOMAML family).

    Returns:
        `OuterLoop`: the step function and any extra trained module.

    Raises:
        ValueError: for ``finetune``/``none``, which are not meta-trained.
    """
    train = config.training
    clip = train.grad_clip if train is not None else None
    algorithm = config.algorithm
    if algorithm in ("fomaml", "protonet", "matching"):
        return OuterLoop(
            lambda episodes: fomaml_step(
                model, episodes, config.inner_loop, optimizer, clip, feature_cache=feature_cache
            )
        )
    if algorithm == "reptile":
        return OuterLoop(lambda episodes: reptile_step(model, episodes, config.inner_loop, optimizer, clip))
    if algorithm == "multitask":
        head = MultitaskHead(labels, int(model.encoder.config.hidden_size)).to(model.device)
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
        return OuterLoop(lambda episodes: multitask_step(model, head, episodes, optimizer, clip), head)
    raise ValueError(f"algorithm {algorithm!r} is not meta-trained")
