"""Matching networks (Vinyals et al. 2016, "Matching Networks for One Shot Learning").

A query is classified by attention over every support example (cosine similarity times the
meta-learned temperature); there is no gradient step. The outer step is the query cross-entropy
(:func:`meta.algorithms.fomaml.query_loss_outer_loop` with the matching classifier).

With label-name anchors and natural-proportion query sets it scored best on the dev tasks of the
CPU ``metasent benchmark`` when it was ``metasent train``'s default, so those are its training
defaults. The default algorithm is now ``fomaml`` (:data:`meta.config.DEFAULT_ALGORITHM`).
"""

from __future__ import annotations

from ..config import InnerLoopConfig
from .fomaml import query_loss_outer_loop
from .registry import AlgorithmSpec, register

SPEC = register(
    AlgorithmSpec(
        name="matching",
        description="matching networks (Vinyals et al. 2016): attention over the support set, no inner-loop "
        "step; trained with label anchors and natural query sets unless told otherwise",
        default_inner_loop=lambda: InnerLoopConfig(steps=0, classifier="matching"),
        make_outer_loop=query_loss_outer_loop,
        distributed=True,
        training_defaults={"label_anchors": True, "query_sampling": "natural"},
    )
)
