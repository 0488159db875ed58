"""The configuration of a training run: options, validation, JSON/YAML files and overrides."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml

from ..errors import Med3DVLMError

SCHEDULES = ("cosine", "constant")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TrainConfig:
    """Everything that defines a run; written to ``<output_dir>/run_config.json`` at start.

    ``max_steps`` (optimiser steps) wins over ``epochs`` when set. ``batch_size`` is per process.
    ``amp_dtype`` applies on CUDA only; the CPU always trains in float32. ``resume`` is False,
    True (``<output_dir>/checkpoint-last``) or the path of a checkpoint folder.
    """

    output_dir: str = "runs/train"
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_every: int = 10
    save_every: int = 0
    num_workers: int = 0
    shuffle: bool = True
    amp_dtype: str = "bfloat16"
    device: str | None = None
    find_unused_parameters: bool = False
    resume: bool | str = False
    progress: bool = True

    def __post_init__(self) -> None:
        # YAML reads "1e-4" as a string and JSON has no tuples: normalise, then validate.
        try:
            self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
            self.min_lr_ratio = float(self.min_lr_ratio)
            self.betas = (float(self.betas[0]), float(self.betas[1]))
            self.grad_clip = None if self.grad_clip is None else float(self.grad_clip)
        except (TypeError, ValueError, IndexError) as error:
            raise Med3DVLMError(f"Invalid training configuration: an option is not a number ({error}).") from None
        counts = ("seed", "epochs", "batch_size", "warmup_steps", "grad_accum", "log_every", "save_every",
                  "num_workers")
        problems = [f"{name} must be an integer" for name in counts if type(getattr(self, name)) is not int]
        if problems:
            raise Med3DVLMError(f"Invalid training configuration: {'; '.join(problems)}.")
        checks = (
            (min(self.batch_size, self.grad_accum, self.log_every) < 1,
             "batch_size, grad_accum and log_every must be >= 1"),
            (self.max_steps is None and self.epochs < 1, "epochs must be >= 1"),
            (self.max_steps is not None and (type(self.max_steps) is not int or self.max_steps < 1),
             "max_steps must be an integer >= 1"),
            (self.lr <= 0, "lr must be > 0"),
            (self.warmup_steps < 0 or self.save_every < 0, "warmup_steps and save_every must be >= 0"),
            (self.schedule not in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.amp_dtype not in AMP_DTYPES, f"amp_dtype must be one of {tuple(AMP_DTYPES)}"),
        )
        problems = [text for bad, text in checks if bad]
        if problems:
            raise Med3DVLMError(f"Invalid training configuration: {'; '.join(problems)}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Med3DVLMError(f"Unknown training option(s) {unknown}; valid options are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()):
        """Read a JSON or YAML file, then apply command-line ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise Med3DVLMError(f"Training config {path} does not exist.")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            else:
                raise Med3DVLMError(f"Training config {path} must end in .json, .yaml or .yml.")
        except (ValueError, yaml.YAMLError) as error:
            raise Med3DVLMError(f"Training config {path} is not valid {path.suffix[1:].upper()}: {error}") from error
        if not isinstance(data, dict):
            raise Med3DVLMError(f"Training config {path} must hold a mapping of option: value.")
        return cls.from_dict({**data, **parse_overrides(overrides)})


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=3e-4", "max_steps=10", "resume=true"]`` -> typed values (YAML scalar rules)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Med3DVLMError(f"Override {item!r} must look like key=value.")
        result[key.strip()] = yaml.safe_load(value)
    return result
