"""Loads the officially released Med3DVLM and M3D-LaMed folders: no remote code, no network.

An official folder is a Hugging Face checkpoint whose config.json names a custom model type:
``vlm_qwen`` (Med3DVLM: DCFormer-small -> mixer projector -> Qwen2), ``lamed_phi3`` or
``lamed_llama`` (M3D-LaMed: 3D ViT -> spatial-pooling projector -> Phi-3 / Llama). Their own loading
code needs ``trust_remote_code``; here the same computation is rebuilt from this package's modules
(``Med3DVLM`` / ``M3DLaMed``), whose parameter names equal the official ones up to a fixed prefix:

    model.vision_tower.vision_tower.*  ->  vision_tower.*
    model.mm_projector.*               ->  mm_projector.*
    model.*                            ->  language_model.model.*
    lm_head.*                          ->  language_model.lm_head.*

The model is built on the meta device and every tensor is read from its shard (safetensors, found
through ``model.safetensors.index.json``) straight to the target device and assigned, so host memory
stays near the model's size. Pickled ``.bin`` weights are read only with ``allow_pickle=True``.
Names and shapes are checked against the shard headers before any tensor data is read.

M3D-LaMed's segmentation head (SegVol: ``model.seg_module.*``, ``model.seg_projector.*``) is not
supported; its tensors are left unread.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import GenerationConfig, LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config

from .checkpoints import (CONFIG_NAME, assign_in_batches, check_names_and_shapes, device_name, prepared_tensor,
                          read_config)
from .errors import ModelError
from .models.dcformer import DCFormerConfig
from .models.m3d_lamed import M3DLaMed, M3DLaMedConfig, PoolingProjectorConfig, ViT3DConfig
from .models.projector import ProjectorConfig
from .models.vlm import MODEL_TYPE, Med3DVLM, Med3DVLMConfig
from .prompts import IMAGE_TOKEN
from .quantization import quantizer
from .tokenizer import load_release_tokenizer

KIND_OURS, KIND_MED3DVLM, KIND_M3D_LAMED = "med3dvlm", "official-med3dvlm", "m3d-lamed"
# Official model_type -> (kind, config class of its language model).
OFFICIAL_TYPES: dict[str, tuple[str, type]] = {
    "vlm_qwen": (KIND_MED3DVLM, Qwen2Config),
    "lamed_phi3": (KIND_M3D_LAMED, Phi3Config),
    "lamed_llama": (KIND_M3D_LAMED, LlamaConfig),
}
_ARCHITECTURES = {"VLMQwenForCausalLM": "vlm_qwen", "LamedPhi3ForCausalLM": "lamed_phi3",
                  "LamedLlamaForCausalLM": "lamed_llama"}
# Official name prefix <-> ours; the first match wins, so nested prefixes come before "model.".
PREFIXES = (("model.vision_tower.vision_tower.", "vision_tower."), ("model.mm_projector.", "mm_projector."),
            ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
SEGMENTATION_PREFIXES = ("model.seg_module.", "model.seg_projector.")
# Fields the official configs add to the language model's own; kept out of the LM config.
_MULTIMODAL_FIELDS = {
    "model_type", "architectures", "auto_map", "transformers_version", "vision_tower", "input_size", "dim",
    "depth", "patch_size", "vision_select_layer", "vision_select_feature", "mm_projector_type", "mm_mlp_depth",
    "proj_out_num", "low_output_size", "high_output_size", "low_input_size", "high_input_size",
    "mm_hidden_size", "image_channel", "image_size", "proj_layer_type", "proj_layer_num", "proj_pooling_type",
    "proj_pooling_size", "proj_residual", "segmentation_module", "seg_token_id", "img_token_id",
    "tune_mm_mlp_adapter", "vit_num_layers", "vit_num_heads", "vit_mlp_dim",
}
_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"
_PICKLED_INDEX, _PICKLED = "pytorch_model.bin.index.json", "pytorch_model.bin"
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# ----- what a folder is ---------------------------------------------------------------------------
def official_type(config: dict[str, Any]) -> str | None:
    """The official model_type a config describes (from model_type, else architectures), or None."""
    if config.get("model_type") in OFFICIAL_TYPES:
        return config["model_type"]
    return next((_ARCHITECTURES[a] for a in config.get("architectures") or () if a in _ARCHITECTURES), None)


def folder_kind(folder: str | Path) -> str:
    """``"med3dvlm"`` (saved by this package), ``"official-med3dvlm"`` or ``"m3d-lamed"``."""
    config = read_config(folder)
    if config.get("model_type") == MODEL_TYPE:
        return KIND_OURS
    model_type = official_type(config)
    if model_type is None:
        raise ModelError(f"The model folder {folder} holds a {config.get('model_type')!r} model, which is "
                         f"neither a Med3DVLM bundle nor an official Med3DVLM / M3D-LaMed release.")
    return OFFICIAL_TYPES[model_type][0]


def is_official_folder(folder: str | Path) -> bool:
    """True when ``folder`` has the config.json of an official release (cheap; reads no weights)."""
    path = Path(folder) / CONFIG_NAME
    try:
        return path.is_file() and official_type(json.loads(path.read_text())) is not None
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: the regular loader reports it


def our_name(name: str) -> str:
    """This package's name for an official tensor name (unknown names are returned unchanged)."""
    return next((new + name[len(old):] for old, new in PREFIXES if name.startswith(old)), name)


def official_name(name: str) -> str:
    return next((old + name[len(new):] for old, new in PREFIXES if name.startswith(new)), name)


# ----- weight files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"


def weights_source(folder: str | Path, allow_pickle: bool = False) -> tuple[Path, dict[str, Path] | None]:
    """(index or single weights file, tensor name -> shard from the index, or None for one file)."""
    folder = Path(folder)
    for name, pickled in ((_INDEX, False), (_SINGLE, False), (_PICKLED_INDEX, True), (_PICKLED, True)):
        path = folder / name
        if not path.is_file():
            continue
        if pickled and not allow_pickle:
            raise ModelError(f"The model folder {folder} holds only pickled PyTorch weights ({name}); reading "
                             "them runs pickle code, so pass allow_pickle=True if you trust their source, or "
                             "convert them to safetensors.")
        return path, (_read_index(path) if name.endswith(".json") else None)
    raise ModelError(f"The model folder {folder} has no weights ({_INDEX} or {_SINGLE}); the download is "
                     "incomplete.")


def _read_index(path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        files = {name: path.parent / str(file) for name, file in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"The weights index {path} cannot be read ({error}); download it again.") from error
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise ModelError(f"The weights shard {file} listed in {path.name} is missing; the download is "
                             "incomplete, so download it again.")
    return files


class _Shard:
    """One weights file, read tensor by tensor; a read error becomes a ModelError naming the file."""

    def __init__(self, path: Path, device: torch.device | str | None = None):
        self.path, self.device = path, device
        if path.suffix == ".safetensors":
            self._handle = self._guard(safe_open, str(path), framework="pt", device=device_name(device))
            self.names = self._guard(self._handle.keys)
        else:  # mmap: the data stays on disk until each tensor is copied to its device
            self._tensors = self._guard(torch.load, path, map_location="cpu", weights_only=True, mmap=True)
            self.names = list(self._tensors)

    def _guard(self, function: Callable, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # safetensors and torch report damage with many exception types
            raise ModelError(f"The weights shard {self.path} cannot be read ({error}); it is corrupted or "
                             "truncated, so download it again.") from error

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, torch dtype name) without reading the data."""
        if not hasattr(self, "_handle"):
            tensor = self._tensors[name]
            return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        view = self._guard(self._handle.get_slice, name)
        return tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(view.get_dtype(), "unknown")

    def tensor(self, name: str) -> torch.Tensor:
        if hasattr(self, "_handle"):
            return self._guard(self._handle.get_tensor, name)
        return self._guard(self._tensors[name].to, self.device or "cpu")


def stored_tensors(folder: str | Path, allow_pickle: bool = False) -> tuple[Path, dict[str, StoredTensor]]:
    """(weights source, official tensor name -> file, shape, dtype), from the shard headers only."""
    source, index = weights_source(folder, allow_pickle)
    files = sorted(set(index.values())) if index is not None else [source]
    stored: dict[str, StoredTensor] = {}
    for file in files:
        shard = _Shard(file)
        for name in shard.names:
            if index is None or index.get(name) == file:
                stored[name] = StoredTensor(file, *shard.header(name))
    absent = [name for name in (index or {}) if name not in stored]
    if absent:
        raise ModelError(f"The weights index {source} lists {len(absent)} tensors its shards do not hold "
                         f"({', '.join(absent[:5])}); the shards are from another download, so download "
                         "the folder again.")
    return source, stored


# ----- configs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    """An official folder's config.json, read once: the raw fields and its language model's config."""

    folder: Path
    raw: dict[str, Any]
    model_type: str
    text_config: PretrainedConfig

    @property
    def kind(self) -> str:
        return OFFICIAL_TYPES[self.model_type][0]

    @classmethod
    def read(cls, folder: str | Path) -> Release:
        folder = Path(folder)
        raw = read_config(folder)
        model_type = official_type(raw)
        if model_type is None:
            raise ModelError(f"The model folder {folder} is not an official Med3DVLM or M3D-LaMed release "
                             f"(model_type {raw.get('model_type')!r}).")
        fields = {k: v for k, v in raw.items() if k not in _MULTIMODAL_FIELDS}
        fields["use_cache"] = True  # training saved False; the cache changes speed, not results
        try:
            text = OFFICIAL_TYPES[model_type][1].from_dict(fields)
        except (TypeError, ValueError, KeyError) as error:
            raise ModelError(f"The config.json in {folder} has a malformed language-model field ({error}); "
                             "the file may be corrupted.") from error
        return cls(folder, raw, model_type, text)


def load_official_tokenizer(release: Release):
    """The folder's own tokenizer (local files only, no remote code), checked for ``<im_patch>``."""
    folder = release.folder
    tokenizer = load_release_tokenizer(folder, release.text_config)  # tokenizer.json, vocab+merges or tokenizer.model
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        raise ModelError(f"The tokenizer in {folder} has no single {IMAGE_TOKEN} token; it is not the "
                         "tokenizer of a Med3DVLM or M3D-LaMed release.")
    if tokenizer.pad_token is None:  # as official training did: pad with unk (Llama), else eos
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's end of sequence and each ``eos_token_id`` the
    folder's generation_config.json lists (Phi-3 chat models stop at ``<|end|>`` and two others). The
    official code generates with those defaults, so an answer must stop at any of them."""
    listed = model.language_model.generation_config.eos_token_id
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *listed) if i is not None))


def prompt_style(tokenizer, folder: str | Path) -> str:
    """The official code writes the image at absolute positions 1..N. With a tokenizer that adds no BOS
    the placeholders start at 0, so the image goes one past their start ("med3dvlm"); after a BOS it
    covers them exactly ("exact")."""
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=True)["input_ids"]
    start = ids.index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if start > 1:
        raise ModelError(f"The tokenizer in {folder} puts {start} special tokens before the prompt; the "
                         "official image-token insertion supports at most one (a BOS).")
    return "exact" if start else "med3dvlm"


def _require(raw: dict[str, Any], name: str, allowed: tuple, folder: Path) -> Any:
    value = raw.get(name, allowed[0])
    if value not in allowed:
        raise ModelError(f"The config.json in {folder} sets {name}={value!r}; this loader supports the released "
                         f"setting {allowed[0]!r} only.")
    return value


def _med3dvlm_config(raw: dict[str, Any], text, image_token_id: int, style: str, folder: Path) -> Med3DVLMConfig:
    _require(raw, "vision_tower", ("dcformer",), folder)
    _require(raw, "mm_projector_type", ("mixer",), folder)
    _require(raw, "vision_select_layer", (-2,), folder)
    _require(raw, "vision_select_feature", ("cls_patch",), folder)
    height, width, depth = raw.get("input_size", (256, 256, 128))  # official order (H, W, D)
    low_output = raw.get("low_output_size", (192, 128))
    projector = ProjectorConfig(
        low_input_size=raw.get("low_input_size", (256, 384)), high_input_size=raw.get("high_input_size", (32, 768)),
        low_output_size=low_output, high_output_size=raw.get("high_output_size", (64, 128)),
        hidden_size=text.hidden_size, depth=len(low_output), mlp_depth=raw.get("mm_mlp_depth", 2))
    if raw.get("proj_out_num", projector.num_tokens) != projector.num_tokens:
        raise ModelError(f"The config.json in {folder} sets proj_out_num={raw['proj_out_num']} but its projector "
                         f"makes {projector.num_tokens} image tokens; the file is inconsistent.")
    # "dcformer" always builds the small variant, whatever else the config says.
    vision = DCFormerConfig.preset("small", (depth, height, width))
    return Med3DVLMConfig(text, vision, projector, image_token_id, preprocess_preset="med3dvlm", prompt_style=style)


def _m3d_lamed_config(raw: dict[str, Any], text, image_token_id: int, style: str, folder: Path) -> M3DLaMedConfig:
    if "vit3d" not in str(raw.get("vision_tower", "vit3d")).lower():
        raise ModelError(f"The config.json in {folder} sets vision_tower={raw['vision_tower']!r}; this loader "
                         "supports the released 'vit3d' only.")
    _require(raw, "mm_projector_type", ("spp",), folder)
    _require(raw, "vision_select_layer", (-1,), folder)
    _require(raw, "vision_select_feature", ("patch",), folder)
    # The ViT's width/depth/heads are fixed in the official code; vit_* are this package's test overrides.
    vision = ViT3DConfig(
        image_size=raw.get("image_size", (32, 256, 256)), patch_size=raw.get("patch_size", (4, 16, 16)),
        in_channels=raw.get("image_channel", 1), hidden_size=raw.get("mm_hidden_size", 768),
        num_layers=raw.get("vit_num_layers", 12), num_heads=raw.get("vit_num_heads", 12),
        mlp_dim=raw.get("vit_mlp_dim", 3072))
    projector = PoolingProjectorConfig(
        grid=vision.grid, in_dim=vision.hidden_size, out_dim=text.hidden_size,
        pooling_type=raw.get("proj_pooling_type", "spatial"), pooling_size=raw.get("proj_pooling_size", 2),
        layer_type=raw.get("proj_layer_type", "mlp"), layer_num=raw.get("proj_layer_num", 2))
    return M3DLaMedConfig(text, vision, projector, image_token_id, prompt_style=style)


def official_config(release: Release, tokenizer) -> Med3DVLMConfig | M3DLaMedConfig:
    """Our model config for an official folder, given its tokenizer (the source of ``<im_patch>``)."""
    folder = release.folder
    build = _med3dvlm_config if release.kind == KIND_MED3DVLM else _m3d_lamed_config
    try:
        return build(release.raw, release.text_config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                     prompt_style(tokenizer, folder), folder)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise ModelError(f"The config.json in {folder} has a missing or malformed field ({error}); "
                         "the file may be corrupted.") from error


# ----- loading ------------------------------------------------------------------------------------
def load_official(folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  *, allow_pickle: bool = False, quantization: str | None = None) -> tuple[Med3DVLM, Any]:
    """(model in eval mode, tokenizer) of an official Med3DVLM or M3D-LaMed folder.

    ``dtype`` casts floating-point weights (None keeps the stored dtype); ``quantization`` ('4bit' or
    '8bit') quantizes the LM's decoder while it loads. ModelError names any missing, unexpected or
    mis-shaped tensor, and a missing or damaged shard.
    """
    folder = Path(folder)
    release = Release.read(folder)
    tokenizer = load_official_tokenizer(release)
    config = official_config(release, tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ModelError(f"The tokenizer in {folder} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"has {config.text_config.vocab_size}; they are from different releases.")
    source, stored = stored_tensors(folder, allow_pickle)
    with torch.device("meta"):
        model = (M3DLaMed if isinstance(config, M3DLaMedConfig) else Med3DVLM)(config)
    after_batch = quantizer(model, quantization, device)
    plan = _plan(source, model, stored, skip_segmentation=bool(release.raw.get("segmentation_module")))
    by_file: dict[Path, dict[str, str]] = defaultdict(dict)
    for ours, official in plan.items():
        by_file[stored[official].file][ours] = official
    for file, names in by_file.items():
        _load_shard(model, _Shard(file, device), names, stored, dtype, after_batch)
    _finish(model, folder, device)
    return model.eval(), tokenizer


def _load_shard(model: Med3DVLM, shard: _Shard, names: dict[str, str], stored: dict[str, StoredTensor],
                dtype: torch.dtype | None, after_batch: Callable[[], None] | None) -> None:
    """Assigns one shard's tensors (our name -> official name) to the model, batch by batch."""
    assign_in_batches(model, {ours: stored[official].shape for ours, official in names.items()},
                      lambda ours: prepared_tensor(shard.tensor(names[ours]), dtype), after_batch)


def _plan(source: Path, model: Med3DVLM, stored: dict[str, StoredTensor], skip_segmentation: bool) -> dict[str, str]:
    """Our tensor name -> official name for every tensor to read; ModelError on any mismatch."""
    skipped = SEGMENTATION_PREFIXES if skip_segmentation else ()
    tied = {official_name(name) for name in model._tied_keys()}
    files = {name: info for name, info in stored.items() if not name.startswith(skipped) and name not in tied}
    expected = {official_name(name): tuple(t.shape) for name, t in model.state_dict().items()
                if name not in model._tied_keys()}
    check_names_and_shapes(source, expected, {name: info.shape for name, info in files.items()})
    return {our_name(name): name for name in files}


def _finish(model: Med3DVLM, folder: Path, device: torch.device | str | None) -> None:
    """Ties the LM head, computes the non-persistent rotary buffers, applies generation_config.json."""
    model.finish_loading(folder, device)
    lm = model.language_model
    # The official code loads with from_pretrained, which applies the folder's generation defaults
    # (e.g. Qwen2.5's top_k and repetition_penalty); settings passed to generate() still win.
    if (folder / "generation_config.json").is_file():
        try:
            lm.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:
            raise ModelError(f"The generation_config.json in {folder} cannot be read ({error}).") from error
