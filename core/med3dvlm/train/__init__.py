"""Training: a generic loop (single process or torchrun/DDP) that the concrete stages build on."""

from .trainer import TrainConfig, TrainResult, load_trainable, parse_overrides, seed_everything, train

__all__ = ["TrainConfig", "TrainResult", "load_trainable", "parse_overrides", "seed_everything", "train"]
