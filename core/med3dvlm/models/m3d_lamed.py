"""M3D-LaMed (BAAI-DCAI/M3D): 3D ViT encoder -> spatial-pooling projector -> Phi-3 or Llama LM.

Written so that the released M3D-LaMed weights load with the official parameter names:

- ``vision_tower``: the ViT of MONAI 1.3 as the official code builds it (``pos_embed="perceptron"``,
  a class token, qkv without bias): ``patch_embedding.patch_embeddings.1`` (the linear patch
  projection; slot 0 is the parameter-free patch rearrangement), ``patch_embedding.position_embeddings``,
  ``cls_token``, ``blocks.N.{norm1, attn.qkv, attn.out_proj, norm2, mlp.linear1, mlp.linear2}``, ``norm``.
  MONAI itself is not used: newer MONAI blocks carry extra parameters (``norm_cross_attn``) and the
  perceptron embedding needs einops.
- ``mm_projector``: ``projector.N`` (Linear layers, GELU between them for ``layer_type="mlp"``).

As computed officially: the input (B, C, D, H, W) is cut into patches in grid order (D, H, W), each
patch flattened as (pd, ph, pw, C); the encoder output is the final LayerNorm of the last block
without the class token; the projector average-pools the token grid (``pooling_size`` per axis),
then applies the MLP to each token. Everything after the image tokens (insertion at offset 1 from the
start of the sequence, forward, generate) is shared with :class:`Med3DVLM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PretrainedConfig

from med3dvlm.errors import ModelError
from med3dvlm.models.vlm import PROMPT_STYLES, Med3DVLM, PromptLayout

# What the official M3D-LaMed demo used.
M3D_GENERATION = {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "max_new_tokens": 256}
LANGUAGE_MODELS: dict[type, type] = {Phi3Config: Phi3ForCausalLM, LlamaConfig: LlamaForCausalLM}


def _triple(values) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass
class ViT3DConfig:
    """The encoder; ``image_size`` and ``patch_size`` are (D, H, W). Defaults are the released ones."""

    image_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 1
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072

    def __post_init__(self) -> None:
        self.image_size, self.patch_size = _triple(self.image_size), _triple(self.patch_size)
        if len(self.image_size) != 3 or len(self.patch_size) != 3 or any(
                s < p or s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ModelError(f"The 3D ViT needs an image size {self.image_size} that its patch size "
                             f"{self.patch_size} divides, three axes each.")
        if self.hidden_size % self.num_heads:
            raise ModelError(f"The 3D ViT width {self.hidden_size} is not divisible by its "
                             f"{self.num_heads} heads.")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)


@dataclass
class PoolingProjectorConfig:
    """The official "spp" projector: pool the patch grid, then a per-token MLP (or Linear stack)."""

    grid: tuple[int, int, int] = (8, 16, 16)
    in_dim: int = 768
    out_dim: int = 3072
    pooling_type: str = "spatial"
    pooling_size: int = 2
    layer_type: str = "mlp"
    layer_num: int = 2

    def __post_init__(self) -> None:
        self.grid = _triple(self.grid)
        if self.pooling_type not in ("spatial", "sequence") or self.layer_type not in ("mlp", "linear"):
            raise ModelError(f"Unsupported M3D-LaMed projector: pooling {self.pooling_type!r}, layers "
                             f"{self.layer_type!r} (supported: spatial/sequence pooling, mlp/linear layers).")
        if self.layer_num < 1 or self.pooling_size < 1:
            raise ModelError(f"The M3D-LaMed projector needs at least one layer and a pooling size of at "
                             f"least 1, got {self.layer_num} and {self.pooling_size}.")

    @property
    def num_tokens(self) -> int:
        if self.pooling_type == "spatial":
            return math.prod(n // self.pooling_size for n in self.grid)
        return math.prod(self.grid) // self.pooling_size ** 3


class _Patchify(nn.Module):
    """(B, C, D, H, W) -> (B, patches, pd*ph*pw*C): patches in (D, H, W) grid order, as MONAI's
    perceptron embedding ``b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)``."""

    def __init__(self, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, *sizes = x.shape
        (pd, ph, pw), (gd, gh, gw) = self.patch_size, (n // p for n, p in zip(sizes, self.patch_size))
        x = x.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, gd * gh * gw, pd * ph * pw * c)


class PatchEmbedding(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        patch_dim = config.in_channels * math.prod(config.patch_size)
        self.patch_embeddings = nn.Sequential(_Patchify(config.patch_size), nn.Linear(patch_dim, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        # The fused projection is laid out (q|k|v, head, head_dim), as MONAI's SABlock splits it.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.mlp = FeedForward(config.hidden_size, config.mlp_dim)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config.hidden_size, config.num_heads)
        self.norm2 = nn.LayerNorm(config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """``forward`` maps (B, C, D, H, W) to (B, patches, hidden): normalised patch tokens, no class token."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.config.in_channels, *self.config.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ModelError(f"The M3D-LaMed encoder expects images (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}.")
        x = self.patch_embedding(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class PoolingProjector(nn.Module):
    """(B, patches, in_dim) -> (B, num_tokens, out_dim)."""

    def __init__(self, config: PoolingProjectorConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Linear(config.in_dim, config.out_dim)]
        for _ in range(config.layer_num - 1):
            if config.layer_type == "mlp":
                layers.append(nn.GELU())
            layers.append(nn.Linear(config.out_dim, config.out_dim))
        self.projector = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        size, dtype = self.config.pooling_size, x.dtype
        x = x.transpose(1, 2).float()  # (B, C, N); float32 because CPU pooling has no bfloat16 kernel
        if self.config.pooling_type == "spatial":
            x = F.avg_pool3d(x.reshape(*x.shape[:2], *self.config.grid), size, size).flatten(2)
        else:
            x = F.avg_pool1d(x, size ** 3, size ** 3)
        return self.projector(x.transpose(1, 2).to(dtype))


@dataclass
class M3DLaMedConfig(PromptLayout):
    """Everything needed to rebuild M3D-LaMed; the same fields the pipeline reads from Med3DVLMConfig."""

    text_config: PretrainedConfig
    vision_config: ViT3DConfig
    projector_config: PoolingProjectorConfig
    image_token_id: int
    preprocess_preset: str = "m3d_lamed"
    prompt_style: str = "exact"
    generation: dict[str, Any] = field(default_factory=lambda: dict(M3D_GENERATION))

    def __post_init__(self) -> None:
        text, projector = self.text_config, self.projector_config
        problems = []
        if type(text) not in LANGUAGE_MODELS:
            problems.append(f"language model config {type(text).__name__} is not Phi-3 or Llama")
        if self.prompt_style not in PROMPT_STYLES:
            problems.append(f"prompt_style {self.prompt_style!r} is not one of {sorted(PROMPT_STYLES)}")
        if not 0 <= self.image_token_id < text.vocab_size:
            problems.append(f"image_token_id {self.image_token_id} is outside the vocabulary of {text.vocab_size}")
        if projector.in_dim != self.vision_config.hidden_size or projector.out_dim != text.hidden_size:
            problems.append(f"projector {projector.in_dim} -> {projector.out_dim} does not join the encoder "
                            f"width {self.vision_config.hidden_size} to the LM width {text.hidden_size}")
        if projector.grid != self.vision_config.grid:
            problems.append(f"projector grid {projector.grid} differs from the encoder's {self.vision_config.grid}")
        if problems:
            raise ModelError("The M3D-LaMed config is inconsistent: " + "; ".join(problems) + ".")


class M3DLaMed(Med3DVLM):
    """M3D-LaMed with Med3DVLM's interface (encode_images / forward / generate); only the image path
    and the language model class differ. Loaded from official folders by ``med3dvlm.official``."""

    def __init__(self, config: M3DLaMedConfig):
        nn.Module.__init__(self)  # not Med3DVLM.__init__, which would build the DCFormer parts
        self.config = config  # type: ignore[assignment]
        self.vision_tower = ViT3D(config.vision_config)  # type: ignore[assignment]
        self.mm_projector = PoolingProjector(config.projector_config)  # type: ignore[assignment]
        self.language_model = LANGUAGE_MODELS[type(config.text_config)](config.text_config)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, C, D, H, W) in [0, 1] -> (B, num_image_tokens, hidden) image tokens."""
        return self.mm_projector(self.vision_tower(pixels.to(self.vision_tower.cls_token.dtype)))
