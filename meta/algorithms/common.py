"""What several meta-training methods share: keeping the scalar meta-parameters in range after an
outer step (FOMAML, prototypical and matching networks, Reptile, multi-task pre-training)."""

from __future__ import annotations

import math

import torch

from ..model import MetaLearner

MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = math.log(1.0), math.log(100.0)
"""Bounds of ``model.logit_scale``, the log of the head's temperature (1 to 100)."""
MAX_LABEL_LOG_WEIGHT = math.log(20.0)
"""Bound of ``|model.label_log_weight|``, the log of a label anchor's weight (1/20 to 20)."""
MIN_INNER_LOG_LR, MAX_INNER_LOG_LR = math.log(1e-4), math.log(2.0)
"""Bounds of each Meta-SGD ``log(inner learning rate)`` (Li et al. 2017; 1e-4 to 2)."""


@torch.no_grad()
def clamp_meta_parameters(model: MetaLearner) -> None:
    """Keep the logit temperature in [1, 100], a label anchor's weight in [1/20, 20] and the
    Meta-SGD inner learning rates in [1e-4, 2] (in place, no gradient), so that one bad outer step
    cannot make the softmax saturate or the inner loop diverge. Every built-in outer step calls it
    after ``optimizer.step()``.

    Args:
        model (`MetaLearner`): its scalar tensors ``logit_scale`` and ``label_log_weight`` and its
            ``inner_log_lr`` scalars are clamped.
    """
    model.logit_scale.clamp_(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE)
    model.label_log_weight.clamp_(-MAX_LABEL_LOG_WEIGHT, MAX_LABEL_LOG_WEIGHT)
    for log_lr in model.inner_log_lr.values():
        log_lr.clamp_(MIN_INNER_LOG_LR, MAX_INNER_LOG_LR)
