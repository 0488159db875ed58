"""Training the demo tower's ``FindingSegmenter`` on small lesion-centred crops.

Whole volumes spend a small CPU on normal tissue, and a few hundred of them are memorised rather
than learned; a crop of 16 x 32 x 32 model voxels, centred on a lesion two times in three and
placed at random otherwise, is a fresh view at every step (nnU-Net's foreground oversampling).
Targets are the phantoms' own masks carried through the image's preprocessing, on the
segmenter's output grid (its stem's stride; by default (D, H/2, W/2)): the finding kind of each
cell (background + five kinds) and its organ (other + the labelled structures). The loss is
cross-entropy + soft Dice over the kinds, plus cross-entropy over the organs.

MRI studies (the MedMAP detector's evidence) train the same way: an example's pixels are its
sequences, one channel each, on the grid the masks share, and a crop shows the whole study half
of the time, otherwise a random subset of its sequences (``present``), so one network serves a
full study and a single volume.

Training runs through the generic loop (``trainer.train``: resumable checkpoints, DDP under
torchrun, CUDA) in rounds; after each round the volume-level organ x kind AUC on unseen whole
phantoms is measured, giving the learning curve (``curve.json``: AUC against training minutes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.anatomy import LABELS
from ..data.lesions import ABNORMALITIES, PAIRS, present
from ..data.phantoms import Phantom, make_ct_phantom
from ..eval.classification import per_class_auc
from ..models.findings import N_KINDS, N_ORGANS, STEM_STRIDE, FindingSegmenter, coordinate_grid, pair_probabilities
from ..preprocess import PreprocessConfig, carry, preprocess
from .checkpoint import CHECKPOINT_DIR, load_trainable
from .config import TrainConfig
from .dense import cached_examples
from .trainer import train

CROP = (16, 32, 32)         # model voxels (D, H, W); the targets are (16, 16, 16)
LESION_SHARE = 2 / 3        # crops centred on a finding
FULL_STUDY_SHARE = 0.5      # multi-sequence crops showing every sequence; otherwise each with p = 1/2
CENTRES_PER_FINDING = 16    # voxels of each finding remembered as crop centres
ORGAN_WEIGHT = 0.5


def segmenter_targets(phantom: Phantom, config: PreprocessConfig,
                      stride: Sequence[int] = STEM_STRIDE) -> dict[str, torch.Tensor]:
    """Kinds and organs per cell of the segmenter's output grid (model voxels / ``stride``), and
    voxels of each finding.

    kinds, organs: (D, H, W) / stride uint8 class indices (0 = background / other); a cell has a kind
    when any of its voxels is at least half inside a finding of that kind, and then the organ of
    that finding. centres: (n, 3) int16
    model voxels inside findings (a few per finding), where lesion-centred crops are placed.
    """
    truth = phantom.truth
    masks = [truth.label_map == value for value in LABELS] + \
            [truth.finding_map == i + 1 for i in range(len(truth.findings))]
    occupancy = carry(phantom.volume, np.stack(masks).astype(np.float32), config)
    organs, findings = occupancy[:len(LABELS)], occupancy[len(LABELS):]
    organs = torch.cat([(1 - organs.sum(0, keepdim=True)).clamp_min(0), organs])
    organ_index = F.avg_pool3d(organs[None], stride)[0].argmax(0)
    kinds = torch.zeros(len(ABNORMALITIES), *occupancy.shape[1:])
    organ_values = list(LABELS.values())
    for f, occ in zip(truth.findings, findings):
        k = ABNORMALITIES.index(f.kind)
        kinds[k] = torch.maximum(kinds[k], occ)
        # a finding's cells belong to its organ: ascites and effusions lie outside the organ's label
        cells = F.max_pool3d((occ >= 0.5).float()[None, None], stride)[0, 0] > 0
        organ_index[cells] = 1 + organ_values.index(f.organ)
    inside = F.max_pool3d((kinds >= 0.5).float()[None], stride)[0]
    pooled = F.avg_pool3d(kinds[None], stride)[0] * inside
    kind_index = torch.where(inside.any(0), pooled.argmax(0) + 1, 0)
    rng = np.random.default_rng(0)
    centres = []
    for occ in findings:
        voxels = torch.nonzero(occ >= 0.5).numpy()
        if len(voxels):
            centres.append(voxels[rng.choice(len(voxels), min(len(voxels), CENTRES_PER_FINDING), replace=False)])
    centres = np.concatenate(centres) if centres else np.zeros((0, 3), int)
    return {"kinds": kind_index.to(torch.uint8), "organs": organ_index.to(torch.uint8),
            "centres": torch.from_numpy(centres).to(torch.int16), "present": present(truth.pairs)}


def _segmenter_example(args) -> dict:
    seed, n_findings, config = args
    phantom = make_ct_phantom(seed, n_findings=n_findings)
    return {"pixels": preprocess(phantom.volume, config).half(), **segmenter_targets(phantom, config)}


def segmenter_phantoms(cache: Path, seeds: Sequence[int], n_findings: int | None, config: PreprocessConfig,
                       workers: int = 2) -> list[dict]:
    """CT phantoms made in memory (``n_findings`` each; None: as a scan comes, 0-2) with their
    segmenter targets, through a file cache."""
    jobs = {f"phantom:{s}": (s, n_findings, config) for s in seeds}
    return list(cached_examples(cache, jobs, _segmenter_example, workers).values())


class LesionCrops(Dataset):
    """Item i: a crop of one example, drawn from (seed, i) alone (so a resumed run sees the same
    stream), centred on a finding voxel with probability ``lesion_share``; with several channels
    (MRI sequences) also the sequences it shows (``present``)."""

    def __init__(self, examples: Sequence[dict], length: int = 2**20, seed: int = 0, crop=CROP,
                 lesion_share: float = LESION_SHARE) -> None:
        self.examples, self.length, self.seed = list(examples), length, seed
        self.crop, self.lesion_share = tuple(crop), lesion_share
        shape = self.examples[0]["pixels"].shape[1:]
        self.coords = coordinate_grid(shape)
        # the segmenter's stride, as the targets were made for it
        self.stride = np.array(shape) // np.array(self.examples[0]["kinds"].shape)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        example = self.examples[rng.integers(len(self.examples))]
        shape = np.array(example["pixels"].shape[1:])
        crop = np.array(self.crop)
        centres = example["centres"]
        if len(centres) and rng.random() < self.lesion_share:
            centre = centres[rng.integers(len(centres))].numpy() + rng.integers(-crop // 4, crop // 4 + 1)
            start = centre - crop // 2
        else:
            start = rng.integers(0, shape - crop + 1)
        start = np.clip(start, 0, shape - crop) // self.stride * self.stride   # on the output grid
        box = tuple(slice(s, s + c) for s, c in zip(start, crop))
        cells = tuple(slice(s // k, (s + c) // k) for s, c, k in zip(start, crop, self.stride))
        item = {"pixels": example["pixels"][(slice(None), *box)].float(), "coords": self.coords[(slice(None), *box)],
                "kinds": example["kinds"][cells].long(), "organs": example["organs"][cells].long()}
        n = len(example["pixels"])
        if n > 1:
            shown = np.ones(n, bool) if rng.random() < FULL_STUDY_SHARE else rng.random(n) < 0.5
            shown[rng.integers(n)] = True
            item["present"] = torch.from_numpy(shown)
        return item


def segmenter_loss(model: FindingSegmenter, batch: dict) -> torch.Tensor:
    logits = model(batch["pixels"], batch["coords"], batch.get("present"))
    kind_logits, organ_logits = logits.split([N_KINDS, N_ORGANS], 1)
    kinds = batch["kinds"]
    probs = kind_logits.softmax(1)[:, 1:]
    truth = F.one_hot(kinds, N_KINDS).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    has = truth.sum(dims) > 0
    dice = 1 - (2 * (probs * truth).sum(dims) + 1) / ((probs + truth).sum(dims) + 1)
    return (F.cross_entropy(kind_logits, kinds) + (dice[has].mean() if has.any() else 0.0)
            + ORGAN_WEIGHT * F.cross_entropy(organ_logits, batch["organs"]))


@torch.inference_mode()
def finding_scores(segmenter: FindingSegmenter, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """(N, S, D, H, W) whole volumes (MRI: every sequence present) -> (N, len(PAIRS)): each pair's
    largest probability."""
    segmenter.eval()
    device = next(segmenter.parameters()).device
    out = [pair_probabilities(segmenter(chunk.float().to(device))).amax((2, 3, 4)).cpu()
           for chunk in pixels.split(batch_size)]
    return torch.cat(out)


def segmenter_auc(segmenter: FindingSegmenter, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Volume-level organ x kind AUC of the segmenter's maps on whole volumes, and the recall at
    the strict operating point reports need (``strict_recall``)."""
    scores = finding_scores(segmenter, pixels).numpy()
    aucs = per_class_auc(labels.numpy().astype(int), scores)
    return {"macro_auc": float(np.nanmean(aucs)), "strict_recall": strict_recall(labels.numpy() > 0, scores),
            "per_pair_auc": {f"{o}/{k}": (None if np.isnan(a) else round(float(a), 4)) for (o, k), a in zip(PAIRS, aucs)}}


def strict_recall(present: np.ndarray, scores: np.ndarray, false_share: float = 0.10) -> float:
    """Share of the true (volume, pair) findings scored above the lowest threshold at which at most
    ``false_share`` of the volumes have an absent pair above it: a report that names what the
    segmenter sees should invent a finding in at most one volume in ten. The macro AUC saturates
    (0.98 in December 2026) long before this does."""
    false_peak = np.where(present, -np.inf, scores).max(1)        # each volume's highest absent pair
    threshold = np.quantile(false_peak, 1 - false_share, method="higher")
    return round(float((scores[present] > threshold).mean()), 4) if present.any() else float("nan")


def train_segmenter(segmenter: FindingSegmenter, examples: Sequence[dict], held_out: Sequence[dict],
                    config: TrainConfig, rounds: int, steps_per_round: int, log=print, crop=CROP,
                    decay_steps: int = 0) -> list[dict]:
    """Train in ``rounds`` of ``steps_per_round`` steps on ``crop``-sized crops (resuming the run in
    ``config.output_dir`` when it has a checkpoint), scoring the AUC on ``held_out`` whole phantoms
    after each round; then, with ``decay_steps``, a decayed copy (``_decayed``) is what it returns.

    Returns the learning curve of the whole run, earlier sessions included: rows of optimiser
    steps, crops, training seconds (wall and CPU) and macro AUC. The crop stream of a run starts
    at ``base`` (the steps trained before it, when it started from weights without a checkpoint).
    """
    out = Path(config.output_dir)
    curve_path, checkpoint = out / "curve.json", out / CHECKPOINT_DIR
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else []
    if checkpoint.is_dir():  # the run's weights, also when no round is asked for (``--segmenter-rounds 0``)
        load_trainable(segmenter, checkpoint)
    if not rounds and not decay_steps:  # nothing to train: ``examples`` and ``held_out`` may be empty
        return curve
    pixels = torch.stack([e["pixels"] for e in held_out])
    labels = torch.stack([e["present"] for e in held_out])
    done = curve[-1]["steps"] if curve else 0
    # Steps before this run's checkpoints (weights shipped without their optimiser): a fresh run
    # over a fresh crop stream, counted on from there.
    base = curve[-1].get("base", 0) if curve and checkpoint.is_dir() else done
    dataset = LesionCrops(examples, seed=config.seed + base, crop=crop)
    wall, cpu = (curve[-1]["train_seconds"], curve[-1]["cpu_seconds"]) if curve else (0.0, 0.0)
    for _ in range(rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        segmenter.train()
        train(segmenter, dataset, replace(config, max_steps=done - base + steps_per_round, resume=checkpoint.is_dir()),
              loss_fn=segmenter_loss)
        done += steps_per_round
        wall += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        score = segmenter_auc(segmenter, pixels, labels)
        curve.append({"steps": done, "crops": done * config.batch_size, "train_seconds": round(wall, 1),
                      "cpu_seconds": round(cpu, 1), "base": base, "macro_auc": round(score["macro_auc"], 4),
                      "per_pair_auc": score["per_pair_auc"]})
        curve_path.write_text(json.dumps(curve, indent=1) + "\n")
        log(f"segmenter: {done} steps ({done * config.batch_size} crops), {wall / 60:.1f} min: "
            f"macro AUC {score['macro_auc']:.3f}, strict recall {score['strict_recall']:.3f} on {len(held_out)} "
            f"unseen phantoms")
    if decay_steps:
        curve = curve + [_decayed(segmenter, examples, config, curve[-1] if curve else None, decay_steps,
                                  pixels, labels, crop)]
        log(f"segmenter, decayed over {decay_steps} more steps: macro AUC {curve[-1]['macro_auc']:.3f}, "
            f"strict recall {curve[-1]['strict_recall']:.3f}")
    return curve


def _decayed(segmenter: FindingSegmenter, examples: Sequence[dict], config: TrainConfig, last: dict | None,
             decay_steps: int, pixels: torch.Tensor, labels: torch.Tensor, crop) -> dict:
    """``segmenter`` after ``decay_steps`` more steps whose learning rate falls to 0 (cosine), and
    its curve row (``decay_from``: the steps it branched at).

    At a constant rate the segmenter's AUC swings between rounds (0.98 -> 0.85 -> 0.98); a decay
    settles it (warmup-stable-decay). The branch trains in its own folder (``decay-<steps>``), so
    the constant-rate run goes on from its own checkpoint and a rerun reuses a finished branch."""
    done = last["steps"] if last else 0
    folder = Path(config.output_dir) / f"decay-{done}"
    row_path, checkpoint = folder / "row.json", folder / CHECKPOINT_DIR
    if row_path.is_file():
        load_trainable(segmenter, checkpoint)
        return json.loads(row_path.read_text())
    started, cpu_started = time.perf_counter(), time.process_time()
    segmenter.train()
    train(segmenter, LesionCrops(examples, seed=config.seed + done + 1, crop=crop),
          replace(config, output_dir=str(folder), schedule="cosine", min_lr_ratio=0.0,
                  warmup_steps=min(20, decay_steps // 10), max_steps=decay_steps, resume=checkpoint.is_dir()),
          loss_fn=segmenter_loss)
    score = segmenter_auc(segmenter, pixels, labels)
    steps = done + decay_steps
    row = {"steps": steps, "crops": steps * config.batch_size,
           "train_seconds": round((last["train_seconds"] if last else 0) + time.perf_counter() - started, 1),
           "cpu_seconds": round((last["cpu_seconds"] if last else 0) + time.process_time() - cpu_started, 1),
           "base": last.get("base", 0) if last else 0, "decay_from": done,
           "macro_auc": round(score["macro_auc"], 4), "strict_recall": score["strict_recall"],
           "per_pair_auc": score["per_pair_auc"]}
    row_path.write_text(json.dumps(row, indent=1) + "\n")
    return row
