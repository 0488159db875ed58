"""Converts an official Med3DVLM release into this package's bundle (config.json, model.safetensors,
tokenizer), which ``med3dvlm.load`` reads quickly as one file with no official code involved."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import CONFIG_NAME
from .errors import ModelError
from .loading import save_bundle
from .official import KIND_MED3DVLM, folder_kind, load_official


def convert(official_folder: str | Path, out_folder: str | Path, *, dtype: torch.dtype | None = None,
            allow_pickle: bool = False) -> Path:
    """Writes ``official_folder`` (an official Med3DVLM release) as a bundle in ``out_folder``.

    ``dtype`` casts floating-point weights (None keeps the stored dtype). The model is loaded on the
    CPU once, so the machine needs host memory for the weights.
    """
    source, out = Path(official_folder), Path(out_folder)
    kind = folder_kind(source)
    if kind != KIND_MED3DVLM:
        raise ModelError(f"{source} is a {kind} folder; conversion writes the Med3DVLM bundle format, which "
                         "holds official Med3DVLM releases only. Load the folder directly with med3dvlm.load.")
    if (out / CONFIG_NAME).exists():
        raise ModelError(f"The output folder {out} already holds a model; choose an empty folder.")
    model, tokenizer = load_official(source, device="cpu", dtype=dtype, allow_pickle=allow_pickle)
    save_bundle(out, model, tokenizer)
    return out
