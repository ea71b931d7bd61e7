"""Meta-learning for few-shot text classification: the model, the inner loop shared by
meta-training and the server, first-order MAML meta-training, checkpoints and evaluation."""

from .config import CheckpointConfig, EncoderConfig, InnerLoopConfig, TrainConfig
from .inner_loop import Adaptation, inner_loop, predict_proba
from .model import MetaLearner, prototype_head

__all__ = [
    "Adaptation",
    "CheckpointConfig",
    "EncoderConfig",
    "InnerLoopConfig",
    "MetaLearner",
    "TrainConfig",
    "inner_loop",
    "predict_proba",
    "prototype_head",
]
