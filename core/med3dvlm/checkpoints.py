"""Safetensors save/load for the project's models, with errors that name the file and the problem.

Loading is meant for modules built on the meta device: tensors are read from the file straight
to the target device and *assigned* as the module's parameters, so a 7B model never exists twice
in memory (once randomly initialised, once loaded). Shapes are checked against the file's header
before any tensor data is read.

The models use this module for their own ``save_pretrained`` / ``from_pretrained``; whole model
folders (bundles, retrieval towers, what a pipeline loads) are ``loading.py``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import ModelError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_SHOWN = 5  # how many names an error message lists before "and N more"
BATCH_NUMBERS = 1 << 24  # numbers assigned per batch: 32 MiB in 16 bits; a larger tensor is a batch of its own


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict; ModelError if the folder or file is missing or broken."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"The model folder {folder} does not exist; pass a folder holding {CONFIG_NAME} "
                         f"and {WEIGHTS_NAME}.")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"The model folder {folder} has no {CONFIG_NAME}; it is not a saved model.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"The model config {path} cannot be read ({error}); "
                         "the file may be corrupted.") from error
    if not isinstance(config, dict):
        raise ModelError(f"The model config {path} is not a JSON object; the file may be corrupted.")
    return config


def save_weights(module: nn.Module, path: str | Path, skip: Collection[str] = ()) -> None:
    """Writes the module's state dict to a safetensors file, leaving out ``skip`` (tied copies)."""
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items() if name not in skip}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    skip: Collection[str] = (),
    after_batch: Callable[[], None] | None = None,
) -> None:
    """Assigns the tensors of a safetensors file to ``module`` (typically built on the meta device).

    Every state-dict entry except ``skip`` must be in the file with the same shape, and the file
    must hold nothing else; otherwise a ModelError lists the offending names. Floating-point
    tensors are cast to ``dtype`` when given; integer buffers keep their type. ``after_batch``: see
    :func:`assign_in_batches`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"The weights file {path} is missing; the model folder is incomplete.")
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items() if name not in skip}
    with _unreadable(path):
        handle = safe_open(str(path), framework="pt", device=device_name(device))
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}

    def read(name: str) -> torch.Tensor:
        with _unreadable(path):
            return prepared_tensor(handle.get_tensor(name), dtype)

    with handle:  # only reads are guarded: errors of after_batch (quantizing) are not the file's
        check_names_and_shapes(path, expected, stored)
        assign_in_batches(module, stored, read, after_batch)


@contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """Read errors as a ModelError naming the file; running out of GPU memory stays what it is."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # safetensors reports a damaged header or payload with several types
        raise ModelError(f"The weights file {path} cannot be read ({error}); it is corrupted or "
                         "truncated, so save or download it again.") from error


def assign_in_batches(module: nn.Module, shapes: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
                      after_batch: Callable[[], None] | None = None) -> None:
    """Assigns ``read(name)`` to ``module`` for every name in ``shapes``, about BATCH_NUMBERS numbers
    at a time, and calls ``after_batch`` after each batch: a quantizing load rewrites what has just
    arrived, so that the float weights of a large model are never all in memory at once."""
    batch: list[str] = []
    numbers = 0
    for name, shape in shapes.items():
        if batch and numbers + math.prod(shape) > BATCH_NUMBERS:
            _assign(module, batch, read, after_batch)
            batch, numbers = [], 0
        batch.append(name)
        numbers += math.prod(shape)
    if batch:
        _assign(module, batch, read, after_batch)


def _assign(module: nn.Module, names: list[str], read: Callable[[str], torch.Tensor],
            after_batch: Callable[[], None] | None) -> None:
    module.load_state_dict({name: read(name) for name in names}, strict=False, assign=True)
    if after_batch is not None:
        after_batch()


def prepared_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    # safetensors' CPU buffers may be only 16-byte aligned; torch's own are 64-byte aligned, and
    # SIMD kernels then round differently. A copy keeps loaded models bit-identical to saved ones.
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def check_names_and_shapes(path: Path, expected: dict[str, tuple], stored: dict[str, tuple]) -> None:
    """Raises one ModelError describing every missing, unexpected and mis-shaped tensor."""
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    mismatched = [f"{n} {stored[n]} in file vs {expected[n]} in model" for n in expected
                  if n in stored and stored[n] != expected[n]]
    problems = [_listing(label, names) for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if names]
    if problems:
        raise ModelError(f"The weights file {path} does not match the model architecture in its config: "
                         + "; ".join(problems) + ".")


def _listing(label: str, names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{len(names)} {label} ({', '.join(names[:_SHOWN])}{more})"


def device_name(device: torch.device | str | None) -> str:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (i.e. never loaded)."""
    named: Iterable[tuple[str, torch.Tensor]] = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in named if tensor.is_meta]
