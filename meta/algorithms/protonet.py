"""Prototypical networks (Snell et al. 2017, "Prototypical Networks for Few-shot Learning").

The head is built from the class prototypes of the support set and takes no gradient step; the
outer step is the cross-entropy of the query set under that head (the first-order MAML query loss
with no inner step, :func:`meta.algorithms.fomaml.query_loss_outer_loop`).
"""

from __future__ import annotations

from ..config import InnerLoopConfig
from .fomaml import query_loss_outer_loop
from .registry import AlgorithmSpec, register

SPEC = register(
    AlgorithmSpec(
        name="protonet",
        description="prototypical networks (Snell et al. 2017): a class-prototype head, no inner-loop step",
        default_inner_loop=lambda: InnerLoopConfig(steps=0),
        make_outer_loop=query_loss_outer_loop,
        distributed=True,
    )
)
