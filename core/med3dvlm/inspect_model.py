"""What a model folder holds and how much memory its weights need, from file headers only.

    >>> print(format_description(describe_model("Med3DVLM-Qwen-2.5-7B")))

No tensor data is read (safetensors headers give names, shapes and dtypes), so this is instant even
for a 7B model and works on a machine that could not load it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoints import read_config
from .errors import ModelError
from .official import (KIND_M3D_LAMED, KIND_MED3DVLM, KIND_OURS, OFFICIAL_TYPES, SEGMENTATION_PREFIXES, folder_kind,
                       official_type, our_name, stored_tensors)
from .quantization import QUANTIZED_PREFIX, quantized_bytes

TITLES = {KIND_OURS: "Med3DVLM bundle saved by this package",
          KIND_MED3DVLM: "official Med3DVLM release",
          KIND_M3D_LAMED: "official M3D-LaMed release"}
PARTS = (("vision_tower.", "vision encoder"), ("mm_projector.", "projector"), ("language_model.", "language model"))
PRECISIONS = ("float32", "bfloat16", "float16", "8-bit", "4-bit")
_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
          "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _weight_bytes(name: str, shape: tuple[int, ...], dtype: str) -> dict[str, float]:
    """Bytes of one tensor at each precision (integer buffers keep their own size); the decoder's
    Linear weights are quantized as ``med3dvlm.load(..., quantization=...)`` does, the rest is 16-bit."""
    n = math.prod(shape)
    if not (dtype.startswith("float") or dtype.startswith("bfloat")):
        return dict.fromkeys(PRECISIONS, n * _BYTES.get(dtype, 8))
    sizes = {"float32": 4 * n, "bfloat16": 2 * n, "float16": 2 * n, "8-bit": 2 * n, "4-bit": 2 * n}
    if name.startswith(QUANTIZED_PREFIX) and name.endswith(".weight") and len(shape) == 2:
        sizes["8-bit"] = quantized_bytes(shape, "8bit")
        sizes["4-bit"] = quantized_bytes(shape, "4bit")
    return sizes


def describe_model(folder: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """A dict: ``kind``, ``title``, ``language_model``, ``parameters`` (numbers stored, buffers
    included), ``parts`` (per component), ``ignored`` (tensors the loader leaves unread),
    ``stored_dtypes``, ``files``, ``bytes_on_disk`` and ``memory_bytes`` (weights only, per precision)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    config = read_config(folder)
    if kind == KIND_OURS:
        lm_type = (config.get("text_config") or {}).get("model_type", "unknown")
    else:
        lm_type = OFFICIAL_TYPES[official_type(config)][1].model_type
    _, stored = stored_tensors(folder, allow_pickle)
    skipped = SEGMENTATION_PREFIXES if kind == KIND_M3D_LAMED and config.get("segmentation_module") else ()
    parts = {label: 0 for _, label in PARTS}
    memory = dict.fromkeys(PRECISIONS, 0.0)
    dtypes: dict[str, int] = {}
    ignored = 0
    for name, info in stored.items():
        count = math.prod(info.shape)
        if name.startswith(skipped):
            ignored += count
            continue
        ours = name if kind == KIND_OURS else our_name(name)
        label = next((label for prefix, label in PARTS if ours.startswith(prefix)), None)
        if label is None:
            raise ModelError(f"The weights of {folder} hold a tensor {name} of no known part; the folder "
                             "does not match its config.json.")
        parts[label] += count
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + count
        for precision, size in _weight_bytes(ours, info.shape, info.dtype).items():
            memory[precision] += size
    files = {info.file for info in stored.values()}
    return {
        "folder": str(folder), "kind": kind, "title": TITLES[kind],
        "language_model": lm_type,
        "parameters": sum(parts.values()), "parts": parts, "ignored": ignored,
        "stored_dtypes": dtypes, "files": len(files), "bytes_on_disk": sum(f.stat().st_size for f in files),
        "memory_bytes": {k: int(round(v)) for k, v in memory.items()},
    }


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_description(info: dict[str, Any]) -> str:
    """The dict of :func:`describe_model` as a few lines of text with a memory table."""
    parts = ", ".join(f"{label} {_count(n)}" for label, n in info["parts"].items() if n)
    dtypes = ", ".join(sorted(info["stored_dtypes"], key=lambda d: -info["stored_dtypes"][d]))
    lines = [
        f"Model folder   {info['folder']}",
        f"What it is     {info['title']} (language model: {info['language_model']})",
        f"Parameters     {info['parameters']:,} ({parts})",
        f"Stored as      {dtypes}; {info['files']} file(s), {_gib(info['bytes_on_disk']).strip()} on disk",
    ]
    if info["ignored"]:
        lines.append(f"Not loaded     {info['ignored']:,} numbers of the segmentation head (unsupported)")
    lines.append("Memory for the weights (activations and the KV cache come on top):")
    lines += [f"  {precision:<9}{_gib(size)}" for precision, size in info["memory_bytes"].items()]
    return "\n".join(lines)
