"""Organ-aware supervision of the demo's image tower, from the phantoms' own masks.

The sigmoid loss (volume <-> report) and per-volume labels teach a small tower focal findings too
slowly on the demo's data: a calcification and a rib, a cyst and a bowel loop look alike until
one knows the organ. The masks say where each organ and finding is, so the tower learns that:

- dense: organ occupancy (the ten labelled structures + other; soft cross-entropy), finding maps
  per kind (shared by all organs, so each kind has several times the positives) and per organ x
  kind (BCE with weighted positives + soft Dice, as positives are rare), on the grid of DCFormer
  stage 1 (input / 8), read by a small feature-pyramid decoder over stages 1-4;
- per token: a linear layer scores every organ x kind pair on each token of stages 3 and 4 (the
  two streams the projector reads) and the maximum over tokens learns the volume's labels
  (multiple-instance learning), so the tokens themselves say what they contain and where.
Decoder and heads are discarded after training. Targets are made on the model's input grid by
carrying the label and finding maps through the image's own preprocessing (``preprocess.carry``)
and pooling them to the stage-1 grid.

The tower learns on its own phantoms, made in memory with four findings each (``tower_phantoms``):
a lesion is rare in a volume, and a rare positive is what a small network learns slowest, so
more findings per volume buy more learning per step. The language model later trains on phantoms
with the usual 0-2 findings, so what it learns of how often findings occur stays true.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.anatomy import LABELS
from ..data.lesions import ABNORMALITIES, PAIRS
from ..data.phantoms import Phantom, make_ct_phantom
from ..data.reports import write_report
from ..models.dcformer import stage_tokens
from ..models.siglip import SigLIPModel, sigmoid_loss
from ..preprocess import PreprocessConfig, carry, preprocess

N_ORGAN_CLASSES = 1 + len(LABELS)   # "other" + the labelled structures
STRIDE = 8                          # input -> DCFormer stage 1 (stem 4, then 2)
FINDING_POS_WEIGHT = 20.0
N_DENSE_OUTPUTS = N_ORGAN_CLASSES + len(ABNORMALITIES) + len(PAIRS)  # organs, kinds, organ x kind
# kind k of ABNORMALITIES -> the PAIRS rows of that kind (the kind map is their maximum)
_KIND_ROWS = [[i for i, (_, kind) in enumerate(PAIRS) if kind == k] for k in ABNORMALITIES]


def present(pairs) -> Tensor:
    """Multi-hot over ``PAIRS`` of (organ, kind) pairs."""
    out = torch.zeros(len(PAIRS))
    for pair in pairs:
        out[PAIRS.index(tuple(pair))] = 1
    return out


def phantom_targets(phantom: Phantom, config: PreprocessConfig) -> dict[str, Tensor]:
    """Dense and volume targets of one phantom, aligned with ``preprocess(phantom.volume, config)``.

    organs: (11, d, h, w) float16 occupancy fractions (channel 0: other); findings: (23, d, h, w)
    uint8, 1 where a cell holds a voxel at least half inside a finding of that pair; present: (23,).
    """
    truth = phantom.truth
    masks = [truth.label_map == value for value in LABELS] + \
            [truth.finding_map == i + 1 for i in range(len(truth.findings))]
    occupancy = carry(phantom.volume, np.stack(masks).astype(np.float32), config)
    organs = occupancy[:len(LABELS)]
    organs = torch.cat([(1 - organs.sum(0, keepdim=True)).clamp_min(0), organs])
    findings = torch.zeros(len(PAIRS), *occupancy.shape[1:])
    for i, f in enumerate(truth.findings):
        row = PAIRS.index((f.organ, f.kind))
        findings[row] = torch.maximum(findings[row], occupancy[len(LABELS) + i])
    return {"organs": F.avg_pool3d(organs[None], STRIDE, ceil_mode=True)[0].half(),
            "findings": (F.max_pool3d(findings[None], STRIDE, ceil_mode=True)[0] >= 0.5).to(torch.uint8),
            "present": present(truth.pairs)}


def _tower_example(args) -> dict:
    seed, n_findings, config = args
    phantom = make_ct_phantom(seed, n_findings=n_findings)
    return {"pixels": preprocess(phantom.volume, config).half(), "targets": phantom_targets(phantom, config),
            "report": write_report(phantom.truth, np.random.default_rng([seed, 1]))}


def cached_examples(cache: Path, jobs: dict[str, tuple], fn, workers: int) -> dict:
    """key -> fn(job) for every job, through a torch file cache (only missing keys are computed)."""
    cache = Path(cache)
    stored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    missing = sorted(key for key in jobs if key not in stored)
    if missing:
        # spawn: a forked child of a process that has run torch's thread pool can hang in it
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            stored.update(zip(missing, pool.map(fn, [jobs[k] for k in missing], chunksize=8)))
        torch.save(stored, cache)
    return {key: stored[key] for key in jobs}


def tower_phantoms(cache: Path, seeds: Sequence[int], n_findings: int, config: PreprocessConfig,
                   workers: int = 2) -> tuple[dict[str, Tensor], list[tuple[str, str]], dict[str, dict[str, Tensor]]]:
    """In-memory CT phantoms with ``n_findings`` each for the image tower: pixels, (key, report)
    pairs and targets, keyed ``phantom:SEED``."""
    examples = cached_examples(cache, {f"phantom:{s}": (s, n_findings, config) for s in seeds}, _tower_example, workers)
    return ({k: e["pixels"] for k, e in examples.items()}, [(k, e["report"]) for k, e in examples.items()],
            {k: e["targets"] for k, e in examples.items()})


def labels_present(roots: Sequence[Path]) -> dict[str, Tensor]:
    """Image path -> ``present`` (multi-hot over PAIRS), from labels.json of M3D-layout phantom datasets."""
    out = {}
    for root in roots:
        for case in json.loads((Path(root) / "labels.json").read_text())["cases"]:
            out.update({str(Path(root) / image): present((f["organ"], f["kind"]) for f in case["findings"]) for image in case["images"]})
    return out


class OrganAwareSigLIP(nn.Module):
    """SigLIP plus the organ-aware decoder and token heads; ``forward`` returns the summed loss."""

    def __init__(self, siglip: SigLIPModel, width: int = 64) -> None:
        super().__init__()
        self.siglip = siglip
        channels = siglip.vision_config.channels
        self.lateral = nn.ModuleList(nn.Conv3d(c, width, 1) for c in channels[1:])
        self.decoder = nn.Sequential(nn.GELU(), nn.Conv3d(width, width, 3, padding=1), nn.GELU(),
                                     nn.Conv3d(width, N_DENSE_OUTPUTS, 1))
        self.token_heads = nn.ModuleList(nn.Linear(c, len(PAIRS)) for c in channels[3:])

    def forward(self, images, input_ids, attention_mask, organs, findings, present) -> dict[str, Tensor]:
        maps = self.siglip.vision_encoder(images)
        grid = maps[1].shape[2:]
        fused = sum(F.interpolate(lateral(m), size=grid, mode="trilinear", align_corners=False)
                    for lateral, m in zip(self.lateral, maps[1:]))
        losses = {**dense_losses(self.decoder(fused), organs, findings),
                  "tokens": sum(F.binary_cross_entropy_with_logits(head(stage_tokens(m)).amax(1), present)
                                for head, m in zip(self.token_heads, maps[3:]))}
        img = self.siglip.embed_image_features(stage_tokens(maps[-1]).mean(1))
        txt = self.siglip.encode_text(input_ids, attention_mask)
        losses["siglip"] = sigmoid_loss(img, txt, self.siglip.t_prime.exp(), self.siglip.bias)
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}


def dense_losses(dense: Tensor, organs: Tensor, findings: Tensor) -> dict[str, Tensor]:
    """Losses of (B, N_DENSE_OUTPUTS, d, h, w) logits against ``phantom_targets``' organs and findings."""
    organ_logits, kind_logits, pair_logits = dense.split([N_ORGAN_CLASSES, len(ABNORMALITIES), len(PAIRS)], 1)
    kinds = torch.stack([findings[:, rows].amax(1) for rows in _KIND_ROWS], 1)
    return {"organs": -(organs * F.log_softmax(organ_logits, 1)).sum(1).mean(),
            "kinds": _rare(kind_logits, kinds), "findings": _rare(pair_logits, findings)}


def token_grid_losses(head: nn.Module, tokens: Tensor, grid: Sequence[int], targets: dict[str, Tensor]) -> Tensor:
    """Dense losses of a per-token head on (B, N, E) tokens laid out on ``grid`` (N = d * h * w)."""
    logits = head(tokens).transpose(1, 2).reshape(len(tokens), -1, *grid)
    return sum(dense_losses(logits, targets["organs"], targets["findings"]).values())


def _rare(logits: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(FINDING_POS_WEIGHT)) \
        + _dice(logits, targets)


def _dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft Dice loss over the batch, per channel, averaged over channels that hold a positive."""
    p = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    inter, total = (p * targets).sum(dims), (p + targets).sum(dims)
    has = targets.sum(dims) > 0
    dice = 1 - (2 * inter + 1) / (total + 1)
    return dice[has].mean() if has.any() else logits.sum() * 0
