"""Training: a generic loop (single process or torchrun/DDP) that the concrete stages build on."""

from .checkpoint import load_trainable
from .config import TrainConfig, parse_overrides
from .trainer import TrainResult, seed_everything, train

__all__ = ["TrainConfig", "TrainResult", "load_trainable", "parse_overrides", "seed_everything", "train"]
