"""MedMAP for MRI: a modality-aware image tower, study fusion over sequences, text-defined classes.

After Zhu et al. (2026): every MRI sequence goes through sequence-specific parts into one shared
image encoder; the sequences of a study are fused with attention weights; each class is a text
prompt embedded by the text encoder and projected into the vision space as a class query;
pre-training aligns volumes with report text (CLIP-style), fine-tuning trains the vision side
with the text encoder frozen. Their encoder is a SwinUNETR (feature size 48) on 128^3 crops;
ours defaults to the project's DCFormer and can swap in MONAI's SwinViT (``backbone="swin"``).

Data flow for a study of S sequences (volumes (1, D, H, W) in [0, 1]):

1. per-sequence stems: a pointwise 1 -> C -> C MLP per sequence (its own intensity response)
   and a per-voxel fusion score;
2. fusion: a softmax over the sequences present turns the scores into per-voxel weights; the
   weighted sum of the stems' features is one C-channel volume. Fusing voxel by voxel (not
   after the encoder) matters: the tissue signatures that tell a cyst from fat or a mass from
   bowel are combinations of sequences at the same voxel, and the encoder then runs once per
   study instead of once per sequence;
3. the shared backbone; multi-scale tokens: the maps from ``token_stage`` on, upsampled to that
   stage's grid, concatenated, through a small MLP and LayerNorm -> (N, E); FiLM by the mean
   embedding of the sequences present, so a single volume and a full study share one scale;
4. class queries q_l = W_q e_l + u_l, e_l the frozen text embedding of "a {kind} in the
   {organ}"; the logit is a soft maximum over tokens of q_l . k_n (keys carry a learned
   position, so a query can look at its organ) plus a per-label bias.

Zero-shot scoring (``zero_shot=True``) uses the pre-trained alignment alone:
exp(t') cos(study embedding, e_l) + b, the sigmoid-loss logit of the prompt.

Finding evidence (``evidence=True``, not in the released layout): a small tower trained on whole
studies misses focal findings (the demo's calcifications cover a few voxels), so a
``FindingSegmenter`` trained on lesion-centred crops reads the study's sequences at once, and a
label's evidence e_l is the largest probability of its organ x kind pair over the study's voxels
(P(kind) x P(organ) in each voxel: the finding inside its organ). The logit becomes the head's
plus a learned per-label calibration a_l logit(e_l) + c_l.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..install_hint import install_hint
from ..volume import MR_SEQUENCES
from ..data.lesions import PAIRS
from .dcformer import DCFormer, DCFormerConfig, stage_tokens
from .findings import STEM_STRIDE, FindingSegmenter, pair_probabilities
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
    onto it). The swin backbone needs sizes divisible by 32 (patch 2, four merges). ``evidence``:
    a finding segmenter adds its calibrated evidence to each logit (labels among ``PAIRS``);
    ``evidence_stride``: its stem's stride, i.e. its output grid (configs saved before the field
    existed had the default).
    """

    labels: tuple[tuple[str, str], ...]
    sequences: tuple[str, ...] = MR_SEQUENCES
    backbone: str = "dcformer"
    input_size: tuple[int, int, int] = (32, 64, 64)
    dcformer_variant: str = "nano"
    swin_feature_size: int = 48
    token_stage: int = 1
    stem_channels: int = 4
    layer_scale_init: float | None = 1.0
    embed_dim: int = 128
    text: TextConfig = field(default_factory=_demo_text)
    prompt_template: str = PROMPT_TEMPLATE
    max_text_length: int = 128
    evidence: bool = False
    evidence_stride: tuple[int, int, int] = STEM_STRIDE

    def __post_init__(self) -> None:
        self.labels = tuple((str(o), str(k)) for o, k in self.labels)
        self.sequences = tuple(self.sequences)
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        self.evidence_stride = tuple(int(s) for s in self.evidence_stride)  # type: ignore[assignment]
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
        if len(self.evidence_stride) != 3 or min(self.evidence_stride) < 1:
            problems.append(f"evidence_stride must be three positive strides (D, H, W), got {self.evidence_stride}")
        if self.stem_channels < 1:
            problems.append(f"stem_channels must be >= 1, got {self.stem_channels}")
        if not 0 <= self.token_stage <= 4:
            problems.append(f"token_stage must be 0..4, got {self.token_stage}")
        if "{kind}" not in self.prompt_template or "{organ}" not in self.prompt_template:
            problems.append(f"prompt_template must contain {{kind}} and {{organ}}, got {self.prompt_template!r}")
        unknown = [pair for pair in self.labels if pair not in PAIRS]
        if self.evidence and unknown:
            problems.append(f"finding evidence knows only the phantoms' organ x kind pairs, not {unknown}")
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

    def __init__(self, feature_size: int, in_chans: int) -> None:
        super().__init__()
        try:  # MONAI's optional imports (einops) fail only when the class is built
            from monai.networks.nets.swin_unetr import SwinTransformer

            self.swinViT = SwinTransformer(in_chans=in_chans, embed_dim=feature_size,
                                           window_size=(SWIN_WINDOW,) * 3, patch_size=(2, 2, 2),
                                           depths=SWIN_DEPTHS, num_heads=SWIN_HEADS)
        except ImportError as error:
            raise ModelError(f"The 'swin' MedMAP backbone needs MONAI and einops ({error}): "
                             f"{install_hint('monai', 'einops')}, or use backbone='dcformer'.") from error
        self.channels = tuple(feature_size * 2 ** i for i in range(5))

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.swinViT(x, normalize=True))


def build_backbone(config: MedMAPConfig) -> nn.Module:
    """A module mapping (B, stem_channels, D, H, W) to five maps (B, C, d, h, w); ``.channels`` lists C."""
    if config.backbone == "swin":
        return SwinBackbone(config.swin_feature_size, config.stem_channels)
    preset = DCFormerConfig.preset(config.dcformer_variant, input_size=config.input_size)
    backbone = DCFormer(replace(preset, in_chans=config.stem_channels))
    if config.layer_scale_init is not None:
        # The release's 1e-6 layer scale suits long runs of a deep model; trained from scratch in a
        # few hundred steps, blocks that start near identity barely learn.
        for name, param in backbone.named_parameters():
            if name.endswith(".scale"):
                nn.init.constant_(param, config.layer_scale_init)
    return backbone


class SequenceStems(nn.Module):
    """Per-sequence voxel-wise features (1 -> C -> C, GELU between) and a fusion score per voxel.

    Pointwise on purpose: each sequence gets its own intensity response at full resolution,
    costing almost nothing, and the sequences meet voxel by voxel in the fusion that follows.
    """

    def __init__(self, n_sequences: int, channels: int) -> None:
        super().__init__()
        s, c = n_sequences, channels
        self.w1 = nn.Parameter(torch.randn(s, c) * 2)  # inputs are in [0, 1]: spread the GELU knees
        self.b1 = nn.Parameter(torch.rand(s, c) * 2 - 1.5)
        self.w2 = nn.Parameter(torch.randn(s, c, c) / math.sqrt(c))
        self.b2 = nn.Parameter(torch.zeros(s, c))
        self.gate = nn.Parameter(torch.zeros(s, c))
        self.gate_bias = nn.Parameter(torch.zeros(s))

    def forward(self, images: Tensor, sequence_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(M, 1, D, H, W) volumes -> features (M, C, D, H, W) and fusion scores (M, D, H, W)."""
        view = (-1, self.w1.shape[1], 1, 1, 1)
        hidden = F.gelu(images * self.w1[sequence_ids].view(view) + self.b1[sequence_ids].view(view))
        features = torch.einsum("mcdhw,mkc->mkdhw", hidden, self.w2[sequence_ids]) + self.b2[sequence_ids].view(view)
        scores = torch.einsum("mcdhw,mc->mdhw", features, self.gate[sequence_ids])
        return features, scores + self.gate_bias[sequence_ids].view(-1, 1, 1, 1)


class MedMAPModel(nn.Module):
    """Vision tower (per-sequence stems, voxel-wise fusion, shared backbone), text tower, class-query head.

    Call ``use_tokenizer`` (or ``set_prompts``) before scoring labels.
    """

    def __init__(self, config: MedMAPConfig) -> None:
        super().__init__()
        self.config = config
        e, s, n_labels = config.embed_dim, len(config.sequences), len(config.labels)
        grid = config.grid()
        # vision: modality-specific parts around a shared backbone
        self.sequence_stems = SequenceStems(s, config.stem_channels)
        self.backbone = build_backbone(config)
        width = sum(self.backbone.channels[config.token_stage:])
        self.token_proj = nn.Sequential(nn.Linear(width, e), nn.GELU(), nn.Linear(e, e), nn.LayerNorm(e))
        self.sequence_film = nn.Parameter(torch.zeros(s, 2, e))
        self.mm_vision_proj = nn.Linear(e, e)
        # text tower (names as in SigLIPModel)
        self.language_encoder = build_text_model(config.text)
        self.mm_language_proj = nn.Linear(text_width(self.language_encoder), e)
        self.t_prime = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))
        # class-query head
        self.query_proj = nn.Linear(e, e)
        nn.init.zeros_(self.query_proj.weight)
        nn.init.zeros_(self.query_proj.bias)
        # Random, not zero: a zero query matches every region alike, and the first gradients then
        # cannot tell a lesion's region from the rest (the head would have to bootstrap slowly).
        self.label_query = nn.Parameter(torch.randn(n_labels, e) / math.sqrt(e))
        self.key_proj = nn.Linear(e, e)
        self.pos_embed = nn.Parameter(torch.zeros(grid[0] * grid[1] * grid[2], e))
        self.label_bias = nn.Parameter(torch.zeros(n_labels))
        if config.evidence:  # trained on crops (train.lesion_crops), then a fixed part of the detector
            self.evidence = FindingSegmenter(sequences=s, stride=config.evidence_stride)
            self.evidence_scale = nn.Parameter(torch.ones(n_labels))
            self.evidence_bias = nn.Parameter(torch.zeros(n_labels))
            self.pair_rows = [PAIRS.index(pair) for pair in config.labels]
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
        if self.config.evidence:  # BatchNorm keeps the statistics of its own training
            self.evidence.eval()
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

    def encode_study(self, images: Tensor, sequence_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Studies as padded slots: images (B, S, 1, D, H, W), sequence_ids and mask (B, S).

        Returns tokens (B, N, E) and each slot's mean fusion weight (B, S); weights sum to 1 over
        the filled slots of a study.
        """
        if images.ndim != 6 or images.shape[2] != 1 or images.shape[:2] != mask.shape:
            raise ModelError(f"MedMAP expects studies of shape (B, S, 1, D, H, W) with a (B, S) mask, got "
                             f"{tuple(images.shape)} and {tuple(mask.shape)}.")
        if not bool(mask.any(dim=1).all()):
            raise ModelError("Every study needs at least one volume for MedMAP fusion.")
        b, s = mask.shape
        features, scores = self.sequence_stems(images[mask], sequence_ids[mask])
        slot_scores = scores.new_full((b, s, *scores.shape[1:]), float("-inf"))
        slot_scores[mask] = scores
        weights = slot_scores.softmax(dim=1)  # per voxel, over the sequences present
        fused = features.new_zeros(b, *features.shape[1:])
        fused.index_add_(0, mask.nonzero()[:, 0], features * weights[mask].unsqueeze(1))
        maps = self.backbone(fused)[self.config.token_stage:]
        grid = maps[0].shape[2:]
        maps = [maps[0]] + [F.interpolate(m, size=grid, mode="nearest") for m in maps[1:]]
        tokens = self.token_proj(stage_tokens(torch.cat(maps, dim=1)))
        # FiLM by the sequences present: single volumes and full studies live on one scale.
        present = mask.to(tokens.dtype) / mask.sum(dim=1, keepdim=True)
        gamma, beta = torch.einsum("bs,bske->bke", present, self.sequence_film[sequence_ids]).unbind(dim=1)
        tokens = tokens * (1 + gamma[:, None]) + beta[:, None]
        return tokens, weights.flatten(2).mean(dim=-1)

    def global_embedding(self, tokens: Tensor) -> Tensor:
        """(B, N, E) tokens -> (B, E) unit-length study embedding (pre-training, zero-shot)."""
        return F.normalize(self.mm_vision_proj(tokens.mean(dim=1)), dim=-1)

    # ---- scoring ------------------------------------------------------------------------
    def detect_logits(self, tokens: Tensor, zero_shot: bool = False) -> Tensor:
        """(B, N, E) study tokens -> (B, L) label logits; ``zero_shot`` skips the fine-tuned head."""
        labels = self.label_embeddings()
        if zero_shot:
            return self.t_prime.exp() * self.global_embedding(tokens) @ labels.T + self.bias
        queries = self.query_proj(labels) + self.label_query  # (L, E): class queries in vision space
        keys = self.key_proj(tokens + self.pos_embed)  # (B, N, E)
        match = torch.einsum("le,bne->bln", queries, keys)
        # Soft maximum over regions of query-token agreement: a finding anywhere in its organ counts.
        return match.logsumexp(dim=-1) - math.log(match.shape[-1]) + self.label_bias

    def finding_evidence(self, images: Tensor, sequence_ids: Tensor, mask: Tensor) -> Tensor:
        """Studies as in ``encode_study`` -> (B, L): each label's largest pair probability."""
        b, _, _, *size = images.shape
        rows, slots = mask.nonzero(as_tuple=True)
        channels = sequence_ids[rows, slots]
        pixels = images.new_zeros(b, len(self.config.sequences), *size)
        pixels[rows, channels] = images[rows, slots, 0]
        present = mask.new_zeros(b, len(self.config.sequences))
        present[rows, channels] = True
        pairs = pair_probabilities(self.evidence(pixels, present=present))
        return pairs[:, self.pair_rows].amax((2, 3, 4))

    def calibrated(self, evidence: Tensor) -> Tensor:
        """(B, L) evidence -> a_l logit(e_l) + c_l, what it adds to the head's logits."""
        return self.evidence_scale * torch.logit(evidence, eps=1e-4) + self.evidence_bias

    def forward(self, images: Tensor, sequence_ids: Tensor, mask: Tensor, zero_shot: bool = False) -> dict:
        """Studies as in ``encode_study``; returns ``logits`` (B, L) and the fusion ``weights`` (B, S)."""
        tokens, weights = self.encode_study(images, sequence_ids, mask)
        logits = self.detect_logits(tokens, zero_shot)
        if self.config.evidence and not zero_shot:
            logits = logits + self.calibrated(self.finding_evidence(images, sequence_ids, mask))
        return {"logits": logits, "weights": weights}
