"""The un-meta-trained baseline: the pretrained encoder with the default head-only inner loop
(a prototype-initialised head, 5 SGD steps at 0.05; Triantafillou et al. 2020's Proto-MAML head
without meta-training)."""

from __future__ import annotations

from ..config import InnerLoopConfig
from .registry import AlgorithmSpec, register

SPEC = register(
    AlgorithmSpec(
        name="none",
        description="no meta-training: the pretrained encoder with the head-only inner loop",
        default_inner_loop=InnerLoopConfig,
    )
)
