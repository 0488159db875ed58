"""MedMAP for MRI: a modality-aware image tower, study fusion over sequences, text-defined classes.

After Zhu et al. (2026): one image encoder is shared by every MRI sequence and told which
sequence it sees; the volumes of a study are fused with attention weights; each class is a text
prompt embedded by the text encoder and projected into the vision space; pre-training aligns
volumes with report text (CLIP-style), fine-tuning trains the vision side with the text encoder
frozen. Their encoder is a SwinUNETR (feature size 48) on 128^3 crops; ours defaults to the
project's DCFormer and can swap in MONAI's SwinViT (``backbone="swin"``).

Data flow for a study of S sequences (volumes (1, D, H, W) in [0, 1]):

1. per-sequence input affine (a_s x + b_s), shared backbone, multi-scale tokens: the feature maps
   from ``token_stage`` on, upsampled to that stage's grid, concatenated, projected to
   ``embed_dim`` and layer-normed -> (N, E) per volume;
2. per-sequence FiLM on the tokens (t * (1 + gamma_s) + beta_s);
3. fusion: a small gate scores every token of every sequence; a softmax over the sequences
   present gives per-token weights, so each region takes the sequence that shows it best;
4. class queries: q_l = W_q e_l + u_l, e_l the text embedding of "a {kind} in the {organ}";
   attention of q_l over the fused tokens (keys + learned position) pools a per-label image
   feature, projected and L2-normed like the pre-training image embedding; the logit is
   exp(t') cos(v_l, e_l + o_l) + b + c_l.

W_q, u_l, o_l and c_l start at zero, so before fine-tuning the attention is uniform and every
logit equals the zero-shot score exp(t') cos(global image embedding, e_l) + b of the
pre-trained model; fine-tuning departs from there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..volume import MR_SEQUENCES
from .dcformer import DCFormer, DCFormerConfig, stage_tokens
from .text import TextConfig, build_text_model, encode_text_tokens, text_width

PROMPT_TEMPLATE = "a {kind} in the {organ}"
BACKBONES = ("dcformer", "swin")
SWIN_DEPTHS, SWIN_HEADS, SWIN_WINDOW = (2, 2, 2, 2), (3, 6, 12, 24), 7


def tokenize(tokenizer, texts: list[str] | tuple[str, ...], max_length: int) -> dict[str, Tensor]:
    """Token ids and mask for the text tower; right padding, so BERT positions count from the first token."""
    return tokenizer(list(texts), padding=True, padding_side="right", truncation=True, max_length=max_length,
                     add_special_tokens=False, return_tensors="pt")


def _demo_text() -> TextConfig:
    params = {"vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 512, "max_position_embeddings": 160}
    return TextConfig("bert", params, "mean")


@dataclass
class MedMAPConfig:
    """Architecture. ``labels`` are (organ, kind) pairs; ``input_size`` is (D, H, W).

    ``token_stage``: the backbone stage whose grid carries the tokens (later stages are upsampled
    onto it). The swin backbone needs sizes divisible by 32 (patch 2, four merges).
    """

    labels: tuple[tuple[str, str], ...]
    sequences: tuple[str, ...] = MR_SEQUENCES
    backbone: str = "dcformer"
    input_size: tuple[int, int, int] = (32, 64, 64)
    dcformer_variant: str = "nano"
    swin_feature_size: int = 48
    token_stage: int = 2
    embed_dim: int = 128
    text: TextConfig = field(default_factory=_demo_text)
    prompt_template: str = PROMPT_TEMPLATE
    max_text_length: int = 128

    def __post_init__(self) -> None:
        self.labels = tuple((str(o), str(k)) for o, k in self.labels)
        self.sequences = tuple(self.sequences)
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        problems = []
        if not self.labels or len(set(self.labels)) != len(self.labels):
            problems.append(f"labels must be distinct (organ, kind) pairs, got {self.labels}")
        if not self.sequences or len(set(self.sequences)) != len(self.sequences):
            problems.append(f"sequences must be distinct names, got {self.sequences}")
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            problems.append(f"input_size must be three positive sizes (D, H, W), got {self.input_size}")
        elif self.backbone == "swin" and any(s % 32 for s in self.input_size):
            problems.append(f"the swin backbone needs input sizes divisible by 32, got {self.input_size}")
        if not 0 <= self.token_stage <= 4:
            problems.append(f"token_stage must be 0..4, got {self.token_stage}")
        if "{kind}" not in self.prompt_template or "{organ}" not in self.prompt_template:
            problems.append(f"prompt_template must contain {{kind}} and {{organ}}, got {self.prompt_template!r}")
        if problems:
            raise ModelError("Invalid MedMAP configuration: " + "; ".join(problems) + ".")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt_template.format(organ=o, kind=k) for o, k in self.labels]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [list(pair) for pair in self.labels]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedMAPConfig:
        try:
            return cls(**data)
        except TypeError as error:
            raise ModelError(f"The MedMAP config has an unknown or missing field ({error}).") from error

    def grid(self) -> tuple[int, int, int]:
        """(d, h, w) of the token grid at ``token_stage``, by arithmetic."""
        sizes = list(self.input_size)
        if self.backbone == "swin":
            return tuple(n // 2 ** (self.token_stage + 1) for n in sizes)  # type: ignore[return-value]
        for stage in range(self.token_stage + 1):
            stride = 4 if stage == 0 else 2
            sizes = [(n - 1) // stride + 1 for n in sizes]
        return tuple(sizes)  # type: ignore[return-value]


class SwinBackbone(nn.Module):
    """MONAI's SwinViT (the SwinUNETR encoder): five maps of feature_size * (1, 2, 4, 8, 16) channels."""

    def __init__(self, feature_size: int) -> None:
        super().__init__()
        try:
            from monai.networks.nets.swin_unetr import SwinTransformer
        except ImportError as error:
            raise ModelError("The 'swin' MedMAP backbone needs MONAI; install it with "
                             "'pip install monai' or use backbone='dcformer'.") from error
        self.swinViT = SwinTransformer(in_chans=1, embed_dim=feature_size, window_size=(SWIN_WINDOW,) * 3,
                                       patch_size=(2, 2, 2), depths=SWIN_DEPTHS, num_heads=SWIN_HEADS)
        self.channels = tuple(feature_size * 2 ** i for i in range(5))

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.swinViT(x, normalize=True))


def build_backbone(config: MedMAPConfig) -> nn.Module:
    """A module mapping (M, 1, D, H, W) to five maps (M, C, d, h, w); ``.channels`` lists C."""
    if config.backbone == "swin":
        return SwinBackbone(config.swin_feature_size)
    return DCFormer(DCFormerConfig.preset(config.dcformer_variant, input_size=config.input_size))


class MedMAPModel(nn.Module):
    """Vision tower (per-sequence stem/FiLM + shared backbone + fusion), text tower, class-query head.

    Call ``use_tokenizer`` (or ``set_prompts``) before scoring labels.
    """

    def __init__(self, config: MedMAPConfig) -> None:
        super().__init__()
        self.config = config
        e, s, n_labels = config.embed_dim, len(config.sequences), len(config.labels)
        grid = config.grid()
        # vision: modality-specific parts around a shared backbone
        self.sequence_affine = nn.Parameter(torch.tensor([[1.0, 0.0]] * s))
        self.backbone = build_backbone(config)
        width = sum(self.backbone.channels[config.token_stage:])
        self.token_proj = nn.Sequential(nn.Linear(width, e), nn.GELU(), nn.Linear(e, e), nn.LayerNorm(e))
        self.sequence_film = nn.Parameter(torch.zeros(s, 2, e))
        self.fusion_gate = nn.Sequential(nn.Linear(e, e // 2), nn.Tanh(), nn.Linear(e // 2, 1))
        self.mm_vision_proj = nn.Linear(e, e)
        # text tower (names as in SigLIPModel)
        self.language_encoder = build_text_model(config.text)
        self.mm_language_proj = nn.Linear(text_width(self.language_encoder), e)
        self.t_prime = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))
        # class-query head; zero queries make it start as the zero-shot scorer
        self.query_proj = nn.Linear(e, e)
        nn.init.zeros_(self.query_proj.weight)
        nn.init.zeros_(self.query_proj.bias)
        self.label_query = nn.Parameter(torch.zeros(n_labels, e))
        self.key_proj = nn.Linear(e, e)
        self.pos_embed = nn.Parameter(torch.zeros(grid[0] * grid[1] * grid[2], e))
        self.label_bias = nn.Parameter(torch.zeros(n_labels))
        self.register_buffer("prompt_ids", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_mask", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.text_frozen = False
        self._label_cache: Tensor | None = None

    # ---- text ---------------------------------------------------------------------------
    def set_prompts(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Token ids (L, T) of ``config.prompts``, one row per label, in label order."""
        if input_ids.shape[0] != len(self.config.labels) or input_ids.shape != attention_mask.shape:
            raise ModelError(f"MedMAP needs {len(self.config.labels)} tokenized prompts (one per label), "
                             f"got ids {tuple(input_ids.shape)} and mask {tuple(attention_mask.shape)}.")
        device = self.bias.device
        self.prompt_ids, self.prompt_mask = input_ids.to(device), attention_mask.to(device)
        self._label_cache = None

    def use_tokenizer(self, tokenizer) -> None:
        """Tokenizes ``config.prompts`` with the tokenizer the text tower was trained with."""
        tokens = tokenize(tokenizer, self.config.prompts, self.config.max_text_length)
        self.set_prompts(tokens["input_ids"], tokens["attention_mask"])

    def freeze_text(self, frozen: bool = True) -> None:
        """Stops gradients into the text tower and keeps it in eval mode (no dropout)."""
        for module in (self.language_encoder, self.mm_language_proj):
            module.requires_grad_(not frozen)
        self.text_frozen = frozen
        self._label_cache = None
        self.train(self.training)

    def train(self, mode: bool = True) -> MedMAPModel:
        super().train(mode)
        if self.text_frozen:
            self.language_encoder.eval()
        return self

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(n, T) token ids -> (n, E), unit length."""
        pooled = encode_text_tokens(self.language_encoder, input_ids, attention_mask, self.config.text.pooling)
        return F.normalize(self.mm_language_proj(pooled), dim=-1)

    def label_embeddings(self) -> Tensor:
        """(L, E) text embeddings of the class prompts; computed once while the text tower is frozen."""
        if self.prompt_ids.numel() == 0:
            raise ModelError("The MedMAP model has no class prompts; call set_prompts with the tokenized "
                             "config.prompts first.")
        if not self.text_frozen:
            return self.encode_text(self.prompt_ids, self.prompt_mask)
        if self._label_cache is None or self._label_cache.device != self.bias.device:
            with torch.no_grad():
                self._label_cache = self.encode_text(self.prompt_ids, self.prompt_mask)
        return self._label_cache

    # ---- vision -------------------------------------------------------------------------
    def sequence_ids(self, sequences: list[str] | tuple[str, ...]) -> Tensor:
        unknown = [s for s in sequences if s not in self.config.sequences]
        if unknown:
            raise ModelError(f"This MedMAP model knows the sequences {self.config.sequences}, not {unknown}.")
        return torch.tensor([self.config.sequences.index(s) for s in sequences], device=self.bias.device)

    def encode_volumes(self, images: Tensor, sequence_ids: Tensor) -> Tensor:
        """(M, 1, D, H, W) volumes of sequences ``sequence_ids`` (M,) -> tokens (M, N, E)."""
        if images.ndim != 5 or images.shape[1] != 1:
            raise ModelError(f"MedMAP expects volumes of shape (M, 1, D, H, W), got {tuple(images.shape)}.")
        affine = self.sequence_affine[sequence_ids].view(-1, 2, 1, 1, 1, 1)
        maps = self.backbone(images * affine[:, 0] + affine[:, 1])[self.config.token_stage:]
        grid = maps[0].shape[2:]
        maps = [maps[0]] + [F.interpolate(m, size=grid, mode="nearest") for m in maps[1:]]
        tokens = self.token_proj(stage_tokens(torch.cat(maps, dim=1)))
        gamma, beta = self.sequence_film[sequence_ids].unbind(dim=1)
        return tokens * (1 + gamma[:, None]) + beta[:, None]

    def fuse(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (B, S, N, E) of S sequence slots, ``mask`` (B, S) of filled slots.

        Returns the fused tokens (B, N, E) and the weights (B, S, N), which sum to 1 over S.
        """
        if not bool(mask.any(dim=1).all()):
            raise ModelError("Every study needs at least one volume for MedMAP fusion.")
        scores = self.fusion_gate(tokens).squeeze(-1).masked_fill(~mask[:, :, None], float("-inf"))
        weights = scores.softmax(dim=1)
        return (weights.unsqueeze(-1) * tokens).sum(dim=1), weights

    def global_embedding(self, fused: Tensor) -> Tensor:
        """(B, N, E) tokens -> (B, E) unit-length study embedding (pre-training, zero-shot)."""
        return F.normalize(self.mm_vision_proj(fused.mean(dim=1)), dim=-1)

    # ---- scoring ------------------------------------------------------------------------
    def detect_logits(self, fused: Tensor, zero_shot: bool = False) -> Tensor:
        """(B, N, E) fused tokens -> (B, L) label logits; ``zero_shot`` skips the fine-tuned head."""
        labels = self.label_embeddings()
        logits = self.t_prime.exp() * self.global_embedding(fused) @ labels.T + self.bias
        if zero_shot:
            return logits
        queries = self.query_proj(labels) + self.label_query  # (L, E): class queries in vision space
        keys = self.key_proj(fused + self.pos_embed)  # (B, N, E)
        match = torch.einsum("le,bne->bln", queries, keys)
        # Soft maximum over regions of query-token agreement, minus its value for a zero query.
        evidence = match.logsumexp(dim=-1) - math.log(match.shape[-1])
        return logits + evidence + self.label_bias

    def forward(self, images: Tensor, sequence_ids: Tensor, mask: Tensor, zero_shot: bool = False) -> dict:
        """Studies as padded slots: images (B, S, 1, D, H, W), sequence_ids and mask (B, S).

        Returns ``logits`` (B, L) and the fusion ``weights`` (B, S, N).
        """
        b, s = mask.shape
        tokens = self.encode_volumes(images[mask], sequence_ids[mask])
        slots = tokens.new_zeros(b, s, *tokens.shape[1:])
        slots[mask] = tokens
        fused, weights = self.fuse(slots, mask)
        return {"logits": self.detect_logits(fused, zero_shot), "weights": weights}
