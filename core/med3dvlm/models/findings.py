"""Finding evidence for image tokens: a light 3D U-Net that maps where each organ x kind lies.

A small DCFormer learns focal findings slowly from whole volumes and memorises them; a light
U-Net trained on small lesion-centred crops learns every kind in minutes (``train.lesion_crops``).
So a demo tower can carry a ``FindingSegmenter`` next to its DCFormer: per voxel it predicts the
finding kind (background + ``ABNORMALITIES``) and the organ (other + ``LABELS``), their product
gives a probability per organ x kind pair (``PAIRS``), and each image token receives the largest
pair probabilities inside its own cell and where each pair lies inside its organ (``token_evidence``).
The language model then reads, per token, what lies there, which a linear read-out of the tokens can
check (the probe gate).

The network is fully convolutional with BatchNorm, so a 16 x 32 x 32 crop and a whole volume are
normalised alike; three coordinate channels (position in the whole model input, -1..1) let a crop
know left from right, which the kidneys and lungs need.

An MRI study is one input of ``sequences`` channels (the MedMAP detector's evidence): a tissue is
told apart by its signal on several sequences at the same voxel (a cyst and a haemorrhage are both
bright on one of them), so the sequences meet at the stem. Sequences a study lacks are zero, and
one presence channel per sequence says which are there, so one network serves any subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.anatomy import LABELS
from ..data.lesions import ABNORMALITIES, PAIRS

N_KINDS = 1 + len(ABNORMALITIES)    # background + the five kinds
N_ORGANS = 1 + len(LABELS)          # other + the labelled structures
N_AXES = 3                          # a pair's place in its organ, along D, H and W
N_EVIDENCE = len(PAIRS) * (1 + N_AXES)  # channels added to each image token: probability, place
STEM_STRIDE = (1, 2, 2)             # default: the maps come out at (D, H/2, W/2)
# Row of PAIRS -> (kind channel, organ channel) of the segmenter's outputs.
_PAIR_KIND = [1 + ABNORMALITIES.index(kind) for _, kind in PAIRS]
_PAIR_ORGAN = [1 + list(LABELS.values()).index(organ) for organ, _ in PAIRS]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def coordinate_grid(shape: Sequence[int], device=None) -> Tensor:
    """(3, D, H, W) position of every voxel in a volume of ``shape``, each axis from -1 to 1."""
    axes = [torch.linspace(-1, 1, n, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class FindingSegmenter(nn.Module):
    """(B, S, D, H, W) pixels (+ their coordinates) -> (B, N_KINDS + N_ORGANS, D/sd, H/sh, W/sw) logits.

    ``sequences`` (S): input channels; above one, each is an MRI sequence that may be absent.
    ``stride`` (sd, sh, sw) of the stem: the output grid. The default halves the plane (the CT
    demo's voxels are ~3x longer along D than in-plane, at 128 x 128); a detector whose input is
    small in-plane keeps the full grid, where a few-voxel calcification is more than a cell or two.
    The parameters do not depend on it.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 96), sequences: int = 1,
                 stride: Sequence[int] = STEM_STRIDE) -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        self.sequences, self.stride = sequences, tuple(stride)
        inputs = (2 * sequences if sequences > 1 else 1) + 3   # pixels (+ presence) + coordinates
        self.stem = nn.Sequential(nn.Conv3d(inputs, c0, 3, stride=self.stride, padding=1, bias=False),
                                  nn.BatchNorm3d(c0), nn.ReLU(inplace=True))
        self.enc0, self.enc1, self.enc2, self.enc3 = _block(c0, c0), _block(c0, c1), _block(c1, c2), _block(c2, c3)
        self.dec2, self.dec1, self.dec0 = _block(c3 + c2, c2), _block(c2 + c1, c1), _block(c1 + c0, c0)
        self.head = nn.Conv3d(c0, N_KINDS + N_ORGANS, 1)

    def forward(self, pixels: Tensor, coords: Tensor | None = None, present: Tensor | None = None) -> Tensor:
        """``present`` (B, S) bool: the sequences each study holds (default: all)."""
        if coords is None:
            coords = coordinate_grid(pixels.shape[2:], pixels.device).expand(len(pixels), -1, -1, -1, -1)
        inputs = [pixels, coords.to(pixels.dtype)]
        if self.sequences > 1:
            if present is None:
                present = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)
            shown = present.to(pixels.dtype)[..., None, None, None]
            inputs = [pixels * shown, shown.expand_as(pixels), inputs[1]]
        x0 = self.enc0(self.stem(torch.cat(inputs, 1)))
        x1 = self.enc1(F.max_pool3d(x0, (1, 2, 2)))   # in-plane first: keep the few slices
        x2 = self.enc2(F.max_pool3d(x1, 2))
        x3 = self.enc3(F.max_pool3d(x2, 2))
        y = self.dec2(torch.cat([_up(x3, x2), x2], 1))
        y = self.dec1(torch.cat([_up(y, x1), x1], 1))
        return self.head(self.dec0(torch.cat([_up(y, x0), x0], 1)))


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)


def pair_probabilities(logits: Tensor) -> Tensor:
    """Segmenter logits -> (B, len(PAIRS), d, h, w): P(kind) x P(organ) of each pair, per voxel."""
    kinds = logits[:, :N_KINDS].softmax(1)
    organs = logits[:, N_KINDS:].softmax(1)
    return kinds[:, _PAIR_KIND] * organs[:, _PAIR_ORGAN]


def pair_places(logits: Tensor) -> Tensor:
    """Segmenter logits -> (B, len(PAIRS), N_AXES): where each pair's likeliest voxels (those above
    half its peak) lie in its organ, along (D, H, W), from the organ's centre in units that put the
    organ's ends near -1 and 1 (sqrt(3) standard deviations of its probability mass), times the
    pair's peak probability.

    Weighted by the peak, a pair the segmenter does not see is at 0: unweighted, the places of the
    23 pairs, most of them where noise peaks, told the 1,000 training volumes apart, and the
    projector fitted the oracle layout of each (alignment MSE 0.0004, against 0.003 without places)
    while report recall on unseen phantoms fell from 0.62 to 0.57 (December 2026).

    A report's locations are places in an organ ("upper pole", "dome", "lingula"). The deepest
    tokens' cells span the whole depth (a 1 x 4 x 4 and a 1 x 2 x 2 grid at the demo's input), so
    without these channels the poles and the dome cannot be told apart (location accuracy at
    chance, 0.33-0.37, on gate phantoms in December 2026).
    """
    return _places(logits, pair_probabilities(logits))


def _places(logits: Tensor, pairs: Tensor) -> Tensor:
    """``pair_places`` given the pair probabilities of ``logits``."""
    organs = logits[:, N_KINDS:].softmax(1)[:, _PAIR_ORGAN]
    coords = coordinate_grid(logits.shape[2:], logits.device).to(logits.dtype)
    peak = pairs.amax((2, 3, 4), keepdim=True)
    lesion = _weighted_mean((pairs - peak / 2).clamp(min=0), coords)
    centre = _weighted_mean(organs, coords)
    spread = (_weighted_mean(organs, coords ** 2) - centre ** 2).clamp(min=0).sqrt()
    return ((lesion - centre) / (3 ** 0.5 * spread + 1e-3)).clamp(-2, 2) * peak[..., 0, 0]


def _weighted_mean(weights: Tensor, coords: Tensor) -> Tensor:
    """(B, P, d, h, w) weights, (A, d, h, w) coordinates -> (B, P, A) weighted mean coordinates."""
    total = weights.sum((2, 3, 4))[..., None].clamp(min=1e-6)
    return torch.einsum("bpdhw,adhw->bpa", weights, coords) / total


def token_evidence(logits: Tensor, grids: Sequence[Sequence[int]]) -> list[Tensor]:
    """Segmenter logits -> per token grid, (B, N_EVIDENCE, *grid): each pair's largest probability
    inside each token's cell, then its place in its organ (``pair_places``, pair by pair) on every
    token. The pairs and their places are computed once for all grids."""
    pairs = pair_probabilities(logits)
    places = _places(logits, pairs).flatten(1)[..., None, None, None]
    out = []
    for grid in grids:
        cells = F.adaptive_max_pool3d(pairs, tuple(grid))
        out.append(torch.cat([cells, places.expand(-1, -1, *cells.shape[2:])], 1))
    return out
