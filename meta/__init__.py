"""Meta-learning for few-shot text classification: the model, adaptation (the inner loop, heads
and prediction shared by meta-training, evaluation and the server), first-order MAML and the
other meta-training methods, checkpoints and evaluation."""

from .adaptation import AdaptedState, MatchingHead, Predictor, PrototypeHead, inner_loop
from .config import CheckpointConfig, EncoderConfig, InnerLoopConfig, TrainConfig
from .model import MetaLearner

__all__ = [
    "AdaptedState",
    "CheckpointConfig",
    "EncoderConfig",
    "InnerLoopConfig",
    "MatchingHead",
    "MetaLearner",
    "Predictor",
    "PrototypeHead",
    "TrainConfig",
    "inner_loop",
]
