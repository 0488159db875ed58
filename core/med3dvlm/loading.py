"""Model folders in and out: everything a pipeline is loaded from, and the bundles training saves.

A model folder is either this package's bundle (``save_bundle``: config.json, model.safetensors and
the tokenizer) or an official Med3DVLM / M3D-LaMed release (``official.py``). Either may hold
retrieval towers in ``siglip/`` and an MRI abnormality detector in ``medmap/``. ``load_model`` reads
all of it onto one device; ``med3dvlm.load`` wraps the result in a ``Pipeline``.

Imports flow one way: weights I/O (``checkpoints``) -> models -> this module -> pipeline -> cli.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import WEIGHTS_NAME, load_weights, read_config, save_weights, write_config
from .detection import Detector
from .errors import Med3DVLMError, ModelError
from .models.dcformer import DCFormerConfig
from .models.siglip import SigLIPModel
from .models.text import TextConfig
from .models.vlm import Med3DVLM
from .official import is_official_folder, load_official
from .provenance import weights_digest
from .resources import demo_detector_dir, demo_model_dir
from .tokenizer import image_token_id, load_tokenizer

SIGLIP_FOLDER = "siglip"  # a model folder's retrieval towers live in this subfolder
SIGLIP_TYPE = "med3dvlm-siglip"
DETECTOR_FOLDER = "medmap"  # a model folder's MRI abnormality detector, if it has one


# ----- device and precision ---------------------------------------------------------------------
def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise Med3DVLMError(f"Unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16.") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


# ----- bundles: model + tokenizer ---------------------------------------------------------------
def save_bundle(folder: str | Path, model: Med3DVLM, tokenizer) -> None:
    """Saves a model and its tokenizer into one folder, the layout ``load_bundle`` reads."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


def load_bundle(
    folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> tuple[Med3DVLM, Any]:
    """The model and tokenizer saved by ``save_bundle``, checked against each other; ``quantization``
    as in ``Med3DVLM.from_pretrained``."""
    model = Med3DVLM.from_pretrained(folder, device=device, dtype=dtype, quantization=quantization)
    tokenizer = load_tokenizer(folder)
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) > vocab or image_token_id(tokenizer) != model.config.image_token_id:
        raise ModelError(
            f"The tokenizer in {folder} does not belong to its model: {len(tokenizer)} tokens for a "
            f"vocabulary of {vocab}, <im_patch> id {image_token_id(tokenizer)} vs "
            f"{model.config.image_token_id} in config.json."
        )
    return model, tokenizer


# ----- retrieval towers -------------------------------------------------------------------------
def save_siglip(folder: str | Path, model: nn.Module, max_text_length: int) -> None:
    """Writes a SigLIP model (towers, projections, t', b) with the config that rebuilds it."""
    write_config(folder, {"model_type": SIGLIP_TYPE, "vision": asdict(model.vision_config),
                          "text": asdict(model.text_config), "embed_dim": model.embed_dim,
                          "max_text_length": max_text_length})
    save_weights(model, Path(folder) / WEIGHTS_NAME)


def load_siglip(folder: str | Path, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> SigLIPModel:
    """The SigLIP model saved by ``save_siglip``; ``max_text_length`` is set on it."""
    config = read_config(folder)
    if config.get("model_type") != SIGLIP_TYPE:
        raise ModelError(f"The config.json in {folder} describes {config.get('model_type')!r}, not a "
                         f"{SIGLIP_TYPE} retrieval model.")
    try:
        vision, text = DCFormerConfig(**config["vision"]), TextConfig(**config["text"])
        embed_dim, max_text_length = int(config["embed_dim"]), int(config["max_text_length"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"The config.json in {folder} lacks or misnames a field ({error}).") from error
    # Built for real, not on the meta device: the text tower keeps non-persistent buffers
    # (position ids) that are not in the file. Retrieval towers are small next to the LM.
    model = SigLIPModel(vision, text, embed_dim=embed_dim)
    load_weights(model, Path(folder) / WEIGHTS_NAME, device=device, dtype=dtype)
    model.to(device or "cpu")
    model.max_text_length = max_text_length
    return model.eval()


# ----- a whole model folder ---------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What a pipeline is built from: the VLM and its tokenizer, the optional retrieval towers and
    detector, the folder's name and the digest of its weights (for provenance)."""

    model: nn.Module
    tokenizer: Any
    retrieval: SigLIPModel | None
    detector: Detector | None
    name: str
    weights: str


def load_model(model: str | os.PathLike = "demo", device: str = "auto", dtype: str | torch.dtype = "auto",
               quantization: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Everything in a model folder (or the bundled ``"demo"`` model), on one device.

    Our own bundles and the official Med3DVLM / M3D-LaMed release folders are recognised by their
    config; ``allow_pickle`` permits official ``.bin`` weights (read with ``weights_only=True``).
    ``quantization='4bit'`` (NF4) or ``'8bit'`` (LLM.int8) stores the language model's decoder
    layers with bitsandbytes (``pip install 'med3dvlm[quant]'``); the rest keeps ``dtype``.
    """
    demo = str(model) == "demo"
    folder = demo_model_dir() if demo else Path(model).expanduser()
    if not folder.is_dir():
        raise ModelError(f"Model folder {folder} does not exist; pass 'demo' or a folder holding "
                         "config.json and *.safetensors.")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if is_official_folder(folder):
        vlm, tokenizer = load_official(folder, device=torch_device, dtype=torch_dtype, allow_pickle=allow_pickle,
                                       quantization=quantization)
    else:
        vlm, tokenizer = load_bundle(folder, device=torch_device, dtype=torch_dtype, quantization=quantization)
    siglip = folder / SIGLIP_FOLDER
    retrieval = load_siglip(siglip, device=torch_device, dtype=torch_dtype) if siglip.is_dir() else None
    detector_dir = demo_detector_dir() if demo else folder / DETECTOR_FOLDER
    detector = Detector.load(detector_dir, device=torch_device) if detector_dir.is_dir() else None
    weights = weights_digest(folder, *([detector_dir] if detector is not None and demo else []))
    return LoadedModel(vlm, tokenizer, retrieval, detector, "demo" if demo else folder.name, weights)
