"""A MedMoM table's studies as MedMAP inputs: read and preprocessed once, chosen by sequence, batched.

Training (``train.medmap``) and evaluation (``eval.detection_eval``) both work on these samples;
the table itself (layout, reading, writing phantoms) is ``data.medmom``'s, and scoring a model on
them is ``detection.score_studies``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import Med3DVLMError
from ..preprocess import PreprocessConfig, preprocess
from ..readers import read_volume
from .medmom import MedMoMStudy, label_column


@dataclass
class StudySample:
    pixels: dict[str, torch.Tensor]   # sequence -> (1, D, H, W) float16 in [0, 1]
    report: str
    labels: torch.Tensor              # (L,) float32 0/1 in the model's label order
    targets: dict[str, torch.Tensor] | None = None  # phantoms: ``dense.phantom_targets`` on the token grid
    findings: dict[str, torch.Tensor] | None = None  # phantoms: ``lesion_crops.segmenter_targets``


def medmom_samples(studies: Sequence[MedMoMStudy], labels: Sequence[tuple[str, str]], config: PreprocessConfig,
                   sequences: Sequence[str] | None = None, progress: bool = False) -> list[StudySample]:
    """Studies of a MedMoM table (``data.medmom.read_medmom``), read and preprocessed once.

    ``labels`` are the model's, in its order; ``sequences`` (default: all) are the ones kept.
    """
    missing = [label_column(pair) for pair in labels if pair not in studies[0].labels]
    if missing:
        raise Med3DVLMError(f"The MedMoM table has no label column(s) {missing}; the model scores them.")
    out = []
    for study in tqdm(studies, desc="reading MRI studies", disable=not progress, unit="study"):
        kept = {seq: path for seq, path in study.volumes.items() if sequences is None or seq in sequences}
        if not kept:
            raise Med3DVLMError(f"Study {study.study_id} has none of the sequences {tuple(sequences)}.")
        pixels = {seq: preprocess(read_volume(path, modality="MR", sequence=seq), config).to(torch.float16)
                  for seq, path in kept.items()}
        out.append(StudySample(pixels, study.report, torch.tensor([float(study.labels[pair]) for pair in labels])))
    return out


def with_sequences(samples: Sequence[StudySample], sequences: Sequence[str] | None) -> list[StudySample]:
    """The studies that hold every one of ``sequences`` (all studies for None)."""
    return [s for s in samples if sequences is None or all(q in s.pixels for q in sequences)]


def collate_studies(rows):
    """(images, sequence ids, labels, targets) rows -> one batch, each study's volumes padded to the
    batch's largest study; ``mask`` marks the real ones."""
    images, ids, labels, targets = zip(*rows)
    slots = max(len(i) for i in ids)
    batch_images = images[0].new_zeros(len(rows), slots, *images[0].shape[1:])
    batch_ids = torch.zeros(len(rows), slots, dtype=torch.long)
    mask = torch.zeros(len(rows), slots, dtype=torch.bool)
    for b, (image, sid) in enumerate(zip(images, ids)):
        batch_images[b, :len(sid)], batch_ids[b, :len(sid)], mask[b, :len(sid)] = image, sid, True
    return {"images": batch_images, "sequence_ids": batch_ids, "mask": mask, "labels": torch.stack(labels),
            **stacked_targets(targets)}


def stacked_targets(targets) -> dict[str, torch.Tensor]:
    return {} if targets[0] is None else {k: torch.stack([t[k] for t in targets]).float() for k in targets[0]}
