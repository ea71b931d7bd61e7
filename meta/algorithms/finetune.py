"""Fine-tuning, the transfer-learning baseline: no meta-training; the pretrained encoder and a
prototype-initialised head are fine-tuned on each support set (every encoder tensor, 10 SGD
steps at 0.02), as in the fine-tuning baselines of Finn et al. 2017 and Triantafillou et al. 2020.
"""

from __future__ import annotations

from ..config import InnerLoopConfig
from .registry import AlgorithmSpec, register

SPEC = register(
    AlgorithmSpec(
        name="finetune",
        description="no meta-training: the pretrained encoder, every tensor fine-tuned on the support set "
        "(10 steps at 0.02)",
        default_inner_loop=lambda: InnerLoopConfig(steps=10, lr=0.02, adapted_layers=-1),
    )
)
