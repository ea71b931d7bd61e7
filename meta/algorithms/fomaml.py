"""First-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.2 first-order
approximation) over a head built from the support set: the matching-network head (Vinyals et al.
2016) by default, or a Proto-MAML head (Triantafillou et al. 2020).

The inner loop adapts the top encoder layers (their LoRA adapters) and, for Proto-MAML, the head on
the support set; the outer step is the query-loss gradient taken at the adapted parameters. The
query loss itself lives in :mod:`meta.fomaml`; prototypical and matching networks reuse the same
outer step with no inner step (:func:`query_loss_outer_loop`).
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


def lora_meta_sgd_inner_loop() -> InnerLoopConfig:
    """FOMAML's inner loop: 3 SGD steps on the rank-8 LoRA adapters of the top 2 layers (adapters
    on every layer's attention and feed-forward projections are meta-trained), each tensor with its
    own meta-learned learning rate starting at 0.05 (Meta-SGD, Li et al. 2017), on the
    leave-one-out loss of the matching-network head with label anchors; the head is then the
    support set embedded by the adapted encoder. Chosen on the dev tasks over the Proto-MAML head
    (README, "The shipped model")."""
    return InnerLoopConfig(
        steps=3, lr=0.05, adapted_layers=2, classifier="matching", adapter="lora", lora_rank=8, meta_sgd=True
    )


SPEC = register(
    AlgorithmSpec(
        name="fomaml",
        description="first-order MAML (Finn et al. 2017) with Meta-SGD step sizes (Li et al. 2017) over LoRA "
        "adapters (Hu et al. 2021) and a matching-network head (Vinyals et al. 2016): the query-loss gradient at "
        "the support-adapted parameters; 3 inner steps on the top 2 layers' LoRA, base encoder frozen",
        default_inner_loop=lora_meta_sgd_inner_loop,
        make_outer_loop=query_loss_outer_loop,
        distributed=True,
        # LoRA tensors start at B = 0 and need a larger outer step than a pretrained encoder
        training_defaults={"label_anchors": True, "query_sampling": "natural", "outer_lr": 1e-3},
    )
)
