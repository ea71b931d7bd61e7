"""A whole new method in one file: ``toy`` trains only the logit temperature, on the
prototypical query loss, and adapts with its own inner loop (one head-only SGD step at 0.1).

Importing this module registers it; ``tests/test_registry.py`` then trains, evaluates and serves it
through the same commands as the built-in methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from metasent.data.episodes import Episode
from metasent.meta.algorithms import AlgorithmSpec, OuterLoop, OuterLoopContext, register
from metasent.meta.config import InnerLoopConfig
from metasent.meta.model import MetaLearner

NAME = "toy"


def query_loss(model: MetaLearner, episode: Episode) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the query set under the support set's class prototypes (Snell et al. 2017)
    scaled by the model's temperature; the encoder is run without gradients."""
    labels = list(episode.labels)
    with torch.no_grad():
        support = model(**model.tokenize([ex.text for ex in episode.support]))  # (N*K, hidden)
        query = model(**model.tokenize([ex.text for ex in episode.query]))  # (N*Q, hidden)
    support_y = torch.tensor([labels.index(ex.label) for ex in episode.support])
    prototypes = torch.stack([support[support_y == c].mean(0) for c in range(len(labels))])  # (N, hidden)
    logits = model.logit_scale.exp() * query @ F.normalize(prototypes, dim=-1).T  # (N*Q, N)
    targets = torch.tensor([labels.index(ex.label) for ex in episode.query])
    return F.cross_entropy(logits, targets), float((logits.argmax(-1) == targets).float().mean())


def make_outer_loop(context: OuterLoopContext) -> OuterLoop:
    """Only ``logit_scale`` gets a gradient, so the optimizer (AdamW) moves only it."""
    model = context.model

    def step(episodes: Sequence[Episode]) -> tuple[float, float]:
        context.optimizer.zero_grad(set_to_none=True)
        results = [query_loss(model, episode) for episode in episodes]
        loss = torch.stack([loss for loss, _ in results]).mean()
        loss.backward()
        context.optimizer.step()
        return loss.item(), sum(accuracy for _, accuracy in results) / len(results)

    return OuterLoop(step)


SPEC = register(
    AlgorithmSpec(
        name=NAME,
        description="toy (tests): trains only the logit temperature on the prototypical query loss",
        default_inner_loop=lambda: InnerLoopConfig(steps=1, lr=0.1),
        make_outer_loop=make_outer_loop,
        training_defaults={"query_sampling": "natural"},
    )
)
