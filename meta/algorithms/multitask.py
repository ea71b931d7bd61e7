"""Multi-task pre-training, the classic baseline of Finn et al. 2017 (section 5.1): one encoder
and one head trained on every source task by plain supervised learning; at adaptation time the
same inner loop as the other methods fine-tunes on the support set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metasent.data.episodes import Episode

from ..config import InnerLoopConfig
from ..distributed import average_gradients
from ..inner import autocast, encode_labels
from ..model import MetaLearner
from .common import clamp_meta_parameters
from .registry import AlgorithmSpec, OuterLoop, OuterLoopContext, register


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
        `(float, float)`: the mean cross-entropy (nats) and accuracy before the update (this
        rank's; the gradient is averaged over every rank's examples in a distributed run).
    """
    optimizer.zero_grad(set_to_none=True)
    examples = [ex for episode in episodes for ex in (*episode.support, *episode.query)]
    with autocast(model.device):
        targets = encode_labels([ex.label for ex in examples], head.labels, model.device)  # (batch,)
        z = model(**model.tokenize([ex.text for ex in examples]))  # (batch, hidden)
        logits = model.logit_scale.exp() * head(z.float())  # (batch, labels)
        loss = F.cross_entropy(logits, targets)
    loss.backward()
    # the mean over every rank's examples (no-op in one process)
    average_gradients([*model.parameters(), *head.parameters()], len(examples))
    if grad_clip is not None:
        parameters = [p for p in (*model.parameters(), *head.parameters()) if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    return loss.item(), float((logits.argmax(-1) == targets).float().mean())


def make_outer_loop(context: OuterLoopContext) -> OuterLoop:
    """A :class:`MultitaskHead` over the source tasks' labels (added to the optimizer, kept out of
    the checkpoint) and the supervised step (:func:`multitask_step`)."""
    model, optimizer = context.model, context.optimizer
    head = MultitaskHead(context.labels, int(model.encoder.config.hidden_size)).to(model.device)
    optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    return OuterLoop(lambda episodes: multitask_step(model, head, episodes, optimizer, context.grad_clip), head)


SPEC = register(
    AlgorithmSpec(
        name="multitask",
        description="multi-task pre-training (the baseline of Finn et al. 2017): supervised learning on every "
        "source task, then the head-only inner loop as fine-tuning",
        default_inner_loop=InnerLoopConfig,
        make_outer_loop=make_outer_loop,
        distributed=True,
    )
)
