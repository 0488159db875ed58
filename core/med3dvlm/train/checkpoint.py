"""Training checkpoints: trained tensors, optimiser state and every rank's RNG streams, written
atomically and read back so that a resumed run continues bit-exactly."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import DistInfo, barrier
from ..errors import ModelError
from .config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint-last"


def trainable_state(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The trained parameters plus all persistent buffers (BatchNorm statistics change too)."""
    state = model.state_dict()
    keep = set(names) | {name for name, _ in model.named_buffers() if name in state}
    return {key: value.detach().cpu().clone().contiguous() for key, value in state.items() if key in keep}


def load_trainable(model: nn.Module, checkpoint_dir: str | Path) -> list[str]:
    """Load ``model.safetensors`` of a checkpoint into ``model``; returns the loaded names."""
    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"Checkpoint weights {path} are missing; point to a folder written by med3dvlm training.")
    state = load_file(str(path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ModelError(f"Checkpoint {path} does not match {type(model).__name__}: {error}") from error
    if result.unexpected_keys:
        raise ModelError(
            f"Checkpoint {path} holds {len(result.unexpected_keys)} tensors that {type(model).__name__} does not have "
            f"(first: {result.unexpected_keys[0]}); it was saved from a different model."
        )
    return sorted(state)


def rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so torch.load(weights_only=True) can read it back.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: nn.Module, names: list[str], training: dict[str, Any],
                     info: DistInfo) -> Path:
    """Write into a temporary folder, then swap it in: a crash never leaves half a checkpoint."""
    final, tmp = directory / CHECKPOINT_DIR, directory / (CHECKPOINT_DIR + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_state_rank{info.rank}.pt")  # every rank has its own RNG streams
    if info.is_main:
        save_file(trainable_state(model, names), str(tmp / "model.safetensors"))
        torch.save(training, tmp / "training_state.pt")
    barrier()
    if info.is_main:
        old = directory / (CHECKPOINT_DIR + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resume(config: TrainConfig, model: nn.Module, optim, info: DistInfo) -> tuple[int, list[float]]:
    """Restore weights, optimiser, schedule and this rank's RNG streams; returns (step, losses)."""
    folder = Path(config.output_dir) / CHECKPOINT_DIR if config.resume is True else Path(str(config.resume))
    if not (folder / "training_state.pt").is_file():
        raise ModelError(f"Cannot resume: {folder} holds no training_state.pt; train without resume first.")
    load_trainable(model, folder)
    state = torch.load(folder / "training_state.pt", weights_only=True, map_location="cpu")
    optim.load_state_dict(state)
    rng_file = folder / f"rng_state_rank{info.rank}.pt"
    if state["world_size"] == info.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("Resuming with a different number of processes: data order and RNG streams change.")
    logger.info("Resumed from %s at step %d", folder, state["step"])
    return int(state["step"]), list(state["losses"])
