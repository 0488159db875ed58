"""Dual-stream MLP-Mixer projector: low- and high-level image tokens -> LM-width image tokens.

Parameter names follow the official Med3DVLM "mixer" projector so its weights load with
identical keys: ``low_mixer.{i}`` / ``high_mixer.{i}``, each with ``ln1``, ``ln2``,
``mlp1.mm_projector.{0,1.1}`` (token mixing) and ``mlp2.mm_projector.{0,1.1}`` (channel mixing).

Each mixer layer computes LayerNorm -> token MLP -> LayerNorm -> channel MLP with no residual
connections (as released); both LayerNorms act over the layer's *input* channel width. Layer i
of a stream maps (N_i, C_i) to (out_tokens[i], hidden / 2**(depth-1-i)); the two streams are
concatenated along tokens, low stream first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormerConfig


@dataclass
class ProjectorConfig:
    """Sizes as in the official config (``low_input_size`` ... ``mm_mlp_depth``).

    ``*_input_size`` are (tokens, channels) of the stage fed to each stream; ``*_output_size``
    the token count after each mixer layer; ``depth`` the number of mixer layers per stream;
    ``mlp_depth`` the Linear layers per MLP (official ``mm_mlp_depth``).
    """

    low_input_size: tuple[int, int] = (256, 384)
    high_input_size: tuple[int, int] = (32, 768)
    low_output_size: tuple[int, ...] = (192, 128)
    high_output_size: tuple[int, ...] = (64, 128)
    hidden_size: int = 3584
    depth: int = 2
    mlp_depth: int = 2

    def __post_init__(self) -> None:
        for name in ("low_input_size", "high_input_size", "low_output_size", "high_output_size"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.low_output_size) == len(self.high_output_size) == self.depth >= 1:
            raise ModelError(
                f"Projector config needs depth={self.depth} token counts per stream, got "
                f"low_output_size={self.low_output_size}, high_output_size={self.high_output_size}."
            )
        if self.hidden_size % 2**self.depth or self.mlp_depth < 1:
            raise ModelError(
                f"Projector hidden_size {self.hidden_size} must be divisible by 2**depth "
                f"({2**self.depth}) and mlp_depth ({self.mlp_depth}) at least 1."
            )

    @classmethod
    def for_encoder(cls, encoder: DCFormerConfig, hidden_size: int, **sizes) -> ProjectorConfig:
        """Feed stage 3 to the low stream and stage 4 to the high stream, as the released model."""
        low, high = encoder.token_shapes()[-2:]
        return cls(low_input_size=low, high_input_size=high, hidden_size=hidden_size, **sizes)

    @property
    def num_tokens(self) -> int:
        return self.low_output_size[-1] + self.high_output_size[-1]

    def stream_sizes(self, stream: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """((tokens, channels) in, (tokens, channels) out) of each mixer layer of "low" or "high"."""
        size = getattr(self, f"{stream}_input_size")
        layers = []
        for i, tokens in enumerate(getattr(self, f"{stream}_output_size")):
            out = (tokens, self.hidden_size // 2 ** (self.depth - 1 - i))
            layers.append((size, out))
            size = out
        return layers


class _MLP(nn.Module):
    """Linear(in, out) followed by (GELU, Linear(out, out)) x (depth - 1)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int):
        super().__init__()
        more = [nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim)) for _ in range(depth - 1)]
        self.mm_projector = nn.Sequential(nn.Linear(in_dim, out_dim), *more)

    def forward(self, x: Tensor) -> Tensor:
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """(B, N, C) -> (B, N', C'): LayerNorm, token-mixing MLP, LayerNorm, channel-mixing MLP."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int], mlp_depth: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(in_size[1])
        self.ln2 = nn.LayerNorm(in_size[1])
        self.mlp1 = _MLP(in_size[0], out_size[0], mlp_depth)
        self.mlp2 = _MLP(in_size[1], out_size[1], mlp_depth)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


class MixerProjector(nn.Module):
    """``forward(low (B, N_low, C_low), high (B, N_high, C_high)) -> (B, num_tokens, hidden)``."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        for stream in ("low", "high"):
            layers = [MixerLayer(i, o, config.mlp_depth) for i, o in config.stream_sizes(stream)]
            self.add_module(f"{stream}_mixer", nn.ModuleList(layers))

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def forward(self, low_tokens: Tensor, high_tokens: Tensor) -> Tensor:
        for name, tokens in (("low", low_tokens), ("high", high_tokens)):
            expected = getattr(self.config, f"{name}_input_size")
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
                raise ModelError(
                    f"Projector {name} stream expects tokens (B, {expected[0]}, {expected[1]}), "
                    f"got {tuple(tokens.shape)}; the encoder's input size does not match the projector."
                )
        for low_layer, high_layer in zip(self.low_mixer, self.high_mixer):
            low_tokens, high_tokens = low_layer(low_tokens), high_layer(high_tokens)
        return torch.cat([low_tokens, high_tokens], dim=1)
