"""MedMAP detection evaluation: per-label AUC, balanced accuracy and F1, for the full study and
each sequence alone, at the detector's own thresholds (chosen on validation data in training).

A sequence subset is scored on the studies that hold that sequence; a label with only one class
among them has no AUC (NaN in JSON as null, "-" in the table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.medmom import label_column, read_medmom, table_sequences
from ..data.medmom_samples import StudySample, medmom_samples, with_sequences
from ..detection import STUDY_KEY, Detector, score_studies, subsets_of
from ..errors import Med3DVLMError
from ..models.medmap import MedMAPModel
from .classification import multilabel_report

COLUMNS = (("positives", "pos"), ("auc", "AUC"), ("balanced_accuracy", "bal.acc"), ("f1", "F1"),
           ("sensitivity", "sens"), ("specificity", "spec"), ("threshold", "thresh"))


def subset_reports(model: MedMAPModel, samples: Sequence[StudySample], thresholds: Mapping[str, Sequence[float]],
                   sequences: Sequence[str]) -> dict[str, dict]:
    """{subset: {"studies": n, "labels": {label: metrics, ..., "macro": means}}} for the study and each sequence."""
    names = [label_column(pair) for pair in model.config.labels]
    out = {}
    for key, subset in subsets_of(sequences).items():
        chosen = with_sequences(samples, subset)
        if not chosen:
            continue
        y = torch.stack([s.labels for s in chosen]).numpy()
        p = score_studies(model, chosen, subset)
        report = multilabel_report(y, p, thresholds.get(key, thresholds[STUDY_KEY]), names)
        for name, column in zip(names, y.T):
            report[name]["positives"] = int(column.sum())
        report["macro"]["positives"] = int(y.sum())
        out[key] = {"studies": len(chosen), "labels": report}
    return out


def evaluate_detector(detector: Detector, data: str | Path, split: str = "test",
                      progress: bool = False) -> dict[str, dict]:
    """Reads ``split`` of a MedMoM-layout dataset and reports the detector on it (see ``subset_reports``)."""
    studies = read_medmom(data, split)
    sequences = [s for s in table_sequences(studies) if s in detector.sequences]
    if not sequences:
        raise Med3DVLMError(f"The {split} studies of {data} hold none of the sequences the detector knows "
                            f"({', '.join(detector.sequences)}).")
    samples = medmom_samples(studies, detector.labels, detector.preprocess_config, sequences, progress)
    return subset_reports(detector.model, samples, detector.thresholds, sequences)


def _cell(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_reports(results: Mapping[str, dict]) -> str:
    """One table per subset: a row per label, then the macro mean (over labels where defined)."""
    width = max(len(name) for r in results.values() for name in r["labels"])
    lines = []
    for key, result in results.items():
        title = "full study (all its sequences)" if key == STUDY_KEY else f"{key} alone"
        lines += [f"== {title}: {result['studies']} studies",
                  f"{'label':{width}s} " + " ".join(f"{head:>7s}" for _, head in COLUMNS)]
        for name, row in result["labels"].items():
            cells = [str(row["positives"]) if name != "macro" else "", *(_cell(row[k]) for k, _ in COLUMNS[1:])]
            if name == "macro":
                cells[-1] = ""
            lines.append(f"{name:{width}s} " + " ".join(f"{c:>7s}" for c in cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def to_json(results: Mapping[str, dict]) -> dict:
    """``results`` with NaN as None, so the file is strict JSON."""
    def clean(value):
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (float, np.floating)):
            return None if math.isnan(value) else round(float(value), 4)
        return value
    return clean(results)
