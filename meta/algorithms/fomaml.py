"""First-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.2 first-order
approximation) with a Proto-MAML head (Triantafillou et al. 2020).

The inner loop adapts the head (and any top encoder layers it is told to) on the support set; the
outer step is the query-loss gradient taken at the adapted parameters. The query loss itself lives
in :mod:`meta.fomaml`; prototypical and matching networks reuse the same outer step with no inner
step (:func:`query_loss_outer_loop`).
"""

from __future__ import annotations

from ..config import InnerLoopConfig
from ..fomaml import fomaml_step
from .registry import AlgorithmSpec, OuterLoop, OuterLoopContext, register


def query_loss_outer_loop(context: OuterLoopContext) -> OuterLoop:
    """The first-order MAML outer step (:func:`meta.fomaml.fomaml_step`) with the context's inner
    loop: FOMAML with inner steps, the prototypical- or matching-network loss with none.

    Args:
        context (`OuterLoopContext`): model, config, optimizer and feature cache.

    Returns:
        `OuterLoop`: the step; it returns the mean query loss (nats) and query accuracy.
    """
    return OuterLoop(
        lambda episodes: fomaml_step(
            context.model,
            episodes,
            context.config.inner_loop,
            context.optimizer,
            context.grad_clip,
            feature_cache=context.feature_cache,
        )
    )


SPEC = register(
    AlgorithmSpec(
        name="fomaml",
        description="first-order MAML (Finn et al. 2017) with a Proto-MAML head: the query-loss gradient "
        "at the support-adapted parameters; head only, 5 inner steps at 0.05",
        default_inner_loop=InnerLoopConfig,  # head only, 5 steps at 0.05: chosen on validation tasks
        make_outer_loop=query_loss_outer_loop,
    )
)
