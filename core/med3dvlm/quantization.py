"""4-bit (NF4) and 8-bit (LLM.int8) language-model weights through bitsandbytes, on a CUDA GPU or the CPU.

Only the ``nn.Linear`` layers of the LM's decoder are quantized: they hold nearly all of a 7B
model's weights (6.5 of Qwen2.5-7B's 7.6 B). The vision encoder, projector, embeddings, norms
and LM head keep the float dtype: they are small, and answers are sensitive to them.

Our loaders assign tensors in batches (``checkpoints.assign_in_batches``); ``quantizer`` gives
the hook they call after each batch, which quantizes every decoder layer whose float weights
have just arrived, on the device they were read to. So a 7B model never has its 16-bit decoder
on the GPU all at once, and no second copy of the model is built.

bitsandbytes is imported only here, and only when quantization is asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from .errors import Med3DVLMError
from .install_hint import install_hint

MODES = ("4bit", "8bit")
DEVICES = ("cuda", "cpu")  # bitsandbytes' main backends; its MPS and XPU ones are not offered here
MIN_BITSANDBYTES = (0, 46)  # 0.45 quantizes on CUDA only; 0.46 also on the CPU
BITSANDBYTES = "bitsandbytes>=0.46"
QUANTIZED_PREFIX = "language_model.model.layers."  # decoder layers; their nn.Linear modules are quantized
NF4_BLOCK = 64  # weights per 4-bit block, each with one absmax scale
SCALE_BLOCK = 256  # absmax scales per block of the second ("double") quantization, which stores them in 8 bits
OUTLIER_THRESHOLD = 6.0  # LLM.int8: activation columns beyond this run in 16 bits (the paper's value)


def check_quantization(mode: str, device: torch.device | str | None) -> None:
    """A Med3DVLMError that says what to do if ``mode`` cannot run on ``device`` here."""
    if mode not in MODES:
        raise Med3DVLMError(f"Unknown quantization {mode!r}; use '4bit' or '8bit'.")
    _check_device(mode, torch.device(device or "cpu"))
    _check_installed(mode)


def _check_device(mode: str, device: torch.device) -> None:
    if device.type not in DEVICES:
        raise Med3DVLMError(f"{mode} quantization (bitsandbytes) runs on a CUDA GPU or the CPU, not on "
                            f"{device.type}; pass device='cuda' or device='cpu', or quantization=None.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Med3DVLMError(f"{mode} quantization on device='cuda' needs a CUDA GPU, and none is available; "
                            "pass device='cpu' to quantize on the CPU.")


def _check_installed(mode: str) -> None:
    """From the package metadata: importing bitsandbytes is slow, and only quantizing needs it."""
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        raise Med3DVLMError(f"{mode} quantization needs the bitsandbytes package: "
                            f"{install_hint(BITSANDBYTES)}.") from None
    if _release(installed) < MIN_BITSANDBYTES:
        raise Med3DVLMError(f"{mode} quantization needs bitsandbytes {'.'.join(map(str, MIN_BITSANDBYTES))} "
                            f"or newer, but {installed} is installed: {install_hint(BITSANDBYTES)}.")


def _release(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '0.50.2' or '0.47.0.dev0'."""
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def quantizer(model: nn.Module, mode: str | None, device: torch.device | str | None) -> Callable[[], None] | None:
    """The after-batch hook that quantizes ``model`` while it loads onto ``device``, or None when
    ``mode`` is None; a Med3DVLMError first if that cannot work here."""
    if mode is None:
        return None
    check_quantization(mode, device)
    replace = {"4bit": nf4_linear, "8bit": int8_linear}[mode]
    return lambda: quantize_loaded(model, replace)


def quantize_loaded(model: nn.Module, replace: Callable[[nn.Linear], nn.Module]) -> None:
    """Swaps each float decoder Linear whose tensors are all loaded (none left on the meta device)
    for ``replace(linear)``; layers quantized by an earlier call are no longer plain nn.Linear."""
    for name in quantizable_layers(model):
        linear = model.get_submodule(name)
        if not any(p.is_meta for p in linear.parameters()):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, replace(linear))


def quantization_of(model: nn.Module) -> str | None:
    """The mode ``model`` was loaded with, read from its layer classes (no bitsandbytes import)."""
    kinds = {type(module).__name__ for module in model.modules()}
    return "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else None


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the float ``nn.Linear`` modules of the LM's decoder layers."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and name.startswith(QUANTIZED_PREFIX)]


def nf4_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes Linear4bit holding ``linear``'s weight in NF4 (double-quantized scales),
    computing in the weight's float dtype; quantized on the weight's device."""
    bnb = _bitsandbytes()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    # Params4bit quantizes on its first move to a device; moving to its own device quantizes in place.
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=True,
                                     quant_type="nf4", module=layer).to(weight.device)
    layer.bias = linear.bias
    return layer


def int8_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes Linear8bitLt (LLM.int8: int8 rows, one scale per row, outlier columns of
    the input in 16 bits) holding ``linear``'s weight; quantized on the weight's device."""
    bnb = _bitsandbytes()
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=OUTLIER_THRESHOLD, device="meta")
    # Int8Params quantizes only when moved off the CPU, so quantize explicitly wherever the weight is;
    # bitsandbytes quantizes from float16, as its own loading does.
    rows, scales, _ = bnb.functional.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
    layer.bias = linear.bias
    return layer


# Messages bitsandbytes logs that are expected here and only alarm users: LLM.int8 casts its inputs
# to float16 by design, yet recent releases warn about it on every call (for each layer and each
# token); on CPUs with AVX-512 BF16 its import offers an optional kernel fetched from a model hub,
# which we never use (its own fallback runs instead).
_EXPECTED = {"bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
             "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _bitsandbytes():
    """bitsandbytes, imported with its expected-but-alarming log messages filtered out."""
    for name, prefix in _EXPECTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    import bitsandbytes

    return bitsandbytes


def quantized_bytes(shape: tuple[int, ...], mode: str) -> float:
    """Bytes of a (rows, columns) float weight once quantized, without a few constant bytes per layer."""
    numbers = math.prod(shape)
    if mode == "8bit":
        return numbers + 4 * shape[0]  # int8 weights + a float32 scale per row
    blocks = math.ceil(numbers / NF4_BLOCK)
    return numbers / 2 + blocks + 4 * math.ceil(blocks / SCALE_BLOCK)  # 4-bit codes, 8-bit and float32 scales
