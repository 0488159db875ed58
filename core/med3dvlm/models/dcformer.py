"""DCFormer: a 3D ConvNeXt-like image encoder whose convolutions are decomposed into 1D ones.

The architecture and parameter names follow the official Med3DVLM encoder so that its released
weights load with identical state-dict keys (a ``DCFormer`` state dict has the same keys as the
official ``DecompModel``):

- ``encoder.s0.0.{0..3}.c{1,2,3}.{0,1}``: the stem, four decomposed convolutions
  (kernel 7 stride 4, then three kernel 3), each branch Conv3d (with bias) + BatchNorm3d;
- ``encoder.s{1..4}.{i}``: blocks with ``proj`` (first block only: max-pool + 1x1x1 conv),
  ``dwconv.c{1,2,3}.{0,1}`` (depthwise decomposed conv), ``mlp.mlp.{0,3}`` and ``scale``.

Computation details the released weights depend on: the input (B, C, D, H, W) is processed in
the axis order (H, W, D) (branch ``c1`` runs along H, ``c2`` along W, ``c3`` along D); the stem
has no activation; blocks have no normalisation besides the BatchNorm inside each branch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from med3dvlm.errors import ModelError
from med3dvlm.models.findings import N_EVIDENCE, FindingSegmenter, token_evidence

STEM_KERNEL, STEM_STRIDE, STEM_DEPTH, STEM_INNER_KERNEL = 7, 4, 4, 3
MLP_RATIO = 4
LAYER_SCALE_INIT = 1e-6

# name: (blocks per stage s0..s4, channels per stage s0..s4), as released.
PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "nano": ((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "tiny": ((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": ((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": ((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
}
DEFAULT_KERNELS = (13, 11, 9, 7)
DEFAULT_INPUT_SIZE = (128, 256, 256)  # (D, H, W) of the released model


@dataclass
class DCFormerConfig:
    """Encoder hyper-parameters. ``input_size`` is (D, H, W); parameters do not depend on it.

    Lists (e.g. from JSON) are accepted and stored as tuples, so ``DCFormerConfig(**asdict(c))``
    and ``DCFormerConfig(**json.load(f))`` round-trip.

    ``evidence`` (not in the released models): a ``FindingSegmenter`` runs beside the encoder and
    each token of the two deepest stages gains ``N_EVIDENCE`` channels, the largest organ x kind
    probabilities inside its cell and where each pair lies in its organ (``models.findings``).
    """

    variant: str = "small"
    num_blocks: tuple[int, ...] = PRESETS["small"][0]
    channels: tuple[int, ...] = PRESETS["small"][1]
    kernel_sizes: tuple[int, ...] = DEFAULT_KERNELS
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    in_chans: int = 1
    evidence: bool = False

    def __post_init__(self) -> None:
        self.num_blocks = tuple(int(n) for n in self.num_blocks)
        self.channels = tuple(int(c) for c in self.channels)
        self.kernel_sizes = tuple(int(k) for k in self.kernel_sizes)
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        if len(self.num_blocks) != 5 or len(self.channels) != 5 or len(self.kernel_sizes) != 4:
            raise ModelError(
                f"DCFormer config '{self.variant}' needs 5 block counts, 5 channel widths and "
                f"4 kernel sizes, got {self.num_blocks}, {self.channels}, {self.kernel_sizes}."
            )
        if self.num_blocks[0] != 1 or min(self.num_blocks) < 1:
            raise ModelError(
                f"DCFormer config '{self.variant}' must have exactly one stem block and at "
                f"least one block per stage, got num_blocks={self.num_blocks}."
            )
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ModelError(
                f"DCFormer config '{self.variant}' input_size must be (D, H, W) with positive "
                f"sizes, got {self.input_size}."
            )

    @classmethod
    def preset(cls, name: str, input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE) -> DCFormerConfig:
        """The released variants: "nano", "tiny", "small" (used by Med3DVLM), "base"."""
        if name not in PRESETS:
            raise ModelError(f"Unknown DCFormer variant '{name}'; choose one of {sorted(PRESETS)}.")
        blocks, channels = PRESETS[name]
        return cls(name, blocks, channels, DEFAULT_KERNELS, tuple(input_size))

    def token_shapes(self, input_size: tuple[int, int, int] | None = None) -> list[tuple[int, int]]:
        """(tokens, channels) of each stage's output for an input of (D, H, W), by arithmetic."""
        sizes = list(input_size or self.input_size)
        shapes = []
        for stage, channels in enumerate(self.channels):
            # The stem's first conv has stride 4 and pads k//2 only along its own axis, so every
            # axis gives floor((n-1)/4)+1; each later stage opens with MaxPool3d(3, 2, 1).
            stride = STEM_STRIDE if stage == 0 else 2
            sizes = [(n - 1) // stride + 1 for n in sizes]
            shapes.append((sizes[0] * sizes[1] * sizes[2], channels + self.evidence_channels(stage)))
        return shapes

    def evidence_channels(self, stage: int) -> int:
        """Channels ``evidence`` adds to the tokens of ``stage`` (the two deepest stages only)."""
        return N_EVIDENCE if self.evidence and stage >= 3 else 0

    def out_channels(self, stage: int) -> int:
        return self.channels[stage] + self.evidence_channels(stage)


class DecomposedConv3d(nn.Module):
    """Three parallel Conv3d + BatchNorm3d branches with kernels (k,1,1), (1,k,1), (1,1,k), summed.

    In eval mode this equals one Conv3d whose k x k x k kernel is zero except on the three axes
    through its centre (BatchNorm folded into each branch), at a fraction of the cost.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        for axis, name in enumerate(("c1", "c2", "c3")):
            kernel, padding = [1, 1, 1], [0, 0, 0]
            kernel[axis], padding[axis] = kernel_size, kernel_size // 2
            conv = nn.Conv3d(
                in_ch, out_ch, tuple(kernel), stride=stride, padding=tuple(padding), groups=groups
            )
            self.add_module(name, nn.Sequential(conv, nn.BatchNorm3d(out_ch)))

    def forward(self, x: Tensor) -> Tensor:
        return self.c1(x) + self.c2(x) + self.c3(x)


class DCFormerBlock(nn.Module):
    """ConvNeXt-style block: [downsample] -> depthwise decomposed conv -> channel MLP -> scale -> +x."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool):
        super().__init__()
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_ch, out_ch, 1, bias=False)
        else:
            self.pool = self.proj = None
        self.dwconv = DecomposedConv3d(out_ch, out_ch, kernel_size, groups=out_ch)
        # The nested name and the Dropout slot keep the official keys mlp.mlp.0 / mlp.mlp.3.
        hidden = out_ch * MLP_RATIO
        layers = [nn.Linear(out_ch, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, out_ch)]
        self.mlp = nn.Sequential(OrderedDict(mlp=nn.Sequential(*layers)))
        self.scale = nn.Parameter(torch.full((out_ch,), LAYER_SCALE_INIT))

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)  # channels last for the MLP
        y = self.scale * self.mlp(y)
        return x + y.permute(0, 4, 1, 2, 3)


def _stem(in_ch: int, out_ch: int) -> nn.Sequential:
    # No activation between the stem's convolutions: the released model has none.
    # Its first convolution has stride 4 and only axis-aligned 1D kernels, so it reads three lines
    # through each output voxel: 10 of every 64 input voxels (a small lesion can fall between).
    convs = [DecomposedConv3d(in_ch, out_ch, STEM_KERNEL, stride=STEM_STRIDE)]
    convs += [DecomposedConv3d(out_ch, out_ch, STEM_INNER_KERNEL) for _ in range(STEM_DEPTH - 1)]
    return nn.Sequential(*convs)


class DCFormer(nn.Module):
    """The encoder. ``forward`` maps (B, in_chans, D, H, W) to five feature maps (B, C, d, h, w)."""

    def __init__(self, config: DCFormerConfig):
        super().__init__()
        self.config = config
        ch, blocks, kernels = config.channels, config.num_blocks, config.kernel_sizes
        stages: dict[str, nn.Module] = {"s0": nn.Sequential(_stem(config.in_chans, ch[0]))}
        for s in range(1, 5):
            stages[f"s{s}"] = nn.Sequential(
                *(
                    DCFormerBlock(ch[s - 1] if i == 0 else ch[s], ch[s], kernels[s - 1], downsample=i == 0)
                    for i in range(blocks[s])
                )
            )
        self.encoder = nn.ModuleDict(stages)
        if config.evidence:
            self.evidence = FindingSegmenter()

    @property
    def channels(self) -> tuple[int, ...]:
        return self.config.channels

    def token_shapes(self, input_size: tuple[int, int, int] | None = None) -> list[tuple[int, int]]:
        """(tokens, channels) per stage for an input (D, H, W); see ``DCFormerConfig.token_shapes``."""
        return self.config.token_shapes(input_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 5 or x.shape[1] != self.config.in_chans:
            raise ModelError(
                f"DCFormer expects images of shape (B, {self.config.in_chans}, D, H, W), "
                f"got {tuple(x.shape)}."
            )
        pixels = x
        x = x.permute(0, 1, 3, 4, 2)  # (B, C, D, H, W) -> (B, C, H, W, D), the trained axis order
        maps = []
        for stage in self.encoder.values():
            x = stage(x)
            maps.append(x.permute(0, 1, 4, 2, 3))  # back to (B, C, D, H, W); a view, no copy
        if self.config.evidence:
            evidence = token_evidence(self.evidence(pixels), [maps[s].shape[2:] for s in (3, 4)])
            for s, channels in zip((3, 4), evidence):
                maps[s] = torch.cat([maps[s], channels.to(maps[s].dtype)], 1)
        return maps


def stage_tokens(feature_map: Tensor) -> Tensor:
    """Flatten a (B, C, D, H, W) feature map to (B, D*H*W, C) tokens in (D, H, W) order."""
    b, c = feature_map.shape[:2]
    return feature_map.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
