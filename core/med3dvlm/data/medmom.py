"""A MedMoM-like multi-sequence MRI dataset: one table of volumes with reports and per-label findings.

Layout under a data root (what ``write_medmom`` writes and ``read_medmom`` reads):

    medmom.csv                      one row per volume (a study has one row per sequence)
    studies/<study_id>/<SEQ>.nii.gz the volumes, native geometry (not preprocessed)

Columns of ``medmom.csv``:

    study_id   groups the rows of one study
    split      "train", "validation" or "test"
    sequence   one of T1, T2, FLAIR, DWI, ADC, T1C (empty: guessed from the file's header/name)
    path       the volume, relative to the root (or absolute)
    report     the study's report text (repeated on each of its rows)
    <organ>/<kind>   one column per abnormality label, 0 or 1, e.g. "left kidney/cyst"

A JSON file holding a list of row objects with the same keys is read the same way
(``read_medmom("table.json")``). Every row of a study must carry the same split, report and labels.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import Med3DVLMError
from ..modality import guess_modality
from ..readers import write_volume
from ..volume import MR_SEQUENCES, Volume
from .lesions import ALLOWED, ORGANS

TABLE_NAME = "medmom.csv"
BASE_COLUMNS = ("study_id", "split", "sequence", "path", "report")
SPLITS = ("train", "validation", "test")
# Every (organ, kind) pair the phantoms can hold: 23 labels.
PHANTOM_LABELS: tuple[tuple[str, str], ...] = tuple((o, k) for o in ORGANS for k in ALLOWED[o])


def label_column(label: tuple[str, str]) -> str:
    return f"{label[0]}/{label[1]}"


@dataclass(frozen=True)
class MedMoMStudy:
    study_id: str
    split: str
    volumes: dict[str, Path]                  # sequence -> file
    report: str
    labels: dict[tuple[str, str], int]        # (organ, kind) -> 0/1


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise Med3DVLMError(f"The MedMoM table {path} does not exist.")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise Med3DVLMError(f"The MedMoM table {path} must hold a JSON list of row objects.")
            return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise Med3DVLMError(f"The MedMoM table {path} cannot be read ({error}).") from error


def _flag(value: str, where: str) -> int:
    if value.strip() not in ("0", "1"):
        raise Med3DVLMError(f"{where} must be 0 or 1, got {value!r}.")
    return int(value)


def read_medmom(path: str | Path, split: str | None = None) -> list[MedMoMStudy]:
    """The studies of a MedMoM table (a root folder holding medmom.csv, or the CSV/JSON file itself)."""
    path = Path(path)
    table = path / TABLE_NAME if path.is_dir() else path
    rows = _rows(table)
    if not rows:
        raise Med3DVLMError(f"The MedMoM table {table} has no rows.")
    missing = [c for c in BASE_COLUMNS if c not in rows[0]]
    if missing:
        raise Med3DVLMError(f"The MedMoM table {table} lacks the column(s) {missing}; see med3dvlm.data.medmom.")
    label_names = [c for c in rows[0] if c not in BASE_COLUMNS]
    labels = [tuple(c.split("/", 1)) for c in label_names]
    if not labels or any(len(pair) != 2 for pair in labels):
        raise Med3DVLMError(f"The MedMoM table {table} needs label columns named '<organ>/<kind>', "
                            f"got {label_names}.")
    studies: dict[str, MedMoMStudy] = {}
    for number, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        where = f"{table} row {number}"
        volume_path = Path(row["path"])
        volume_path = volume_path if volume_path.is_absolute() else table.parent / volume_path
        sequence = row["sequence"].strip() or guess_modality(None, volume_path)[1]
        if sequence not in MR_SEQUENCES:
            raise Med3DVLMError(f"{where}: sequence {row['sequence']!r} of {volume_path.name} is not one of "
                                f"{MR_SEQUENCES}; fill in the sequence column.")
        if row["split"] not in SPLITS:
            raise Med3DVLMError(f"{where}: split must be one of {SPLITS}, got {row['split']!r}.")
        flags = {pair: _flag(row[name], f"{where} column {name!r}") for pair, name in zip(labels, label_names)}
        study = studies.setdefault(row["study_id"], MedMoMStudy(row["study_id"], row["split"], {},
                                                                row["report"], flags))
        if (study.split, study.report, study.labels) != (row["split"], row["report"], flags):
            raise Med3DVLMError(f"{where}: study {row['study_id']} has rows that disagree on split, report "
                                "or labels.")
        if sequence in study.volumes:
            raise Med3DVLMError(f"{where}: study {row['study_id']} has two {sequence} volumes.")
        study.volumes[sequence] = volume_path
    chosen = [s for s in studies.values() if split is None or s.split == split]
    if not chosen:
        raise Med3DVLMError(f"The MedMoM table {table} has no studies in split {split!r}.")
    return chosen


def write_medmom(root: str | Path, studies: Iterable[tuple[str, str, Mapping[str, Volume], str, Mapping]],
                 labels: Sequence[tuple[str, str]]) -> Path:
    """Writes (study_id, split, {sequence: Volume}, report, {(organ, kind): 0/1}) studies; returns the table."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = root / TABLE_NAME
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*BASE_COLUMNS, *map(label_column, labels)])
        for study_id, split, volumes, report, flags in studies:
            folder = root / "studies" / study_id
            folder.mkdir(parents=True, exist_ok=True)
            for sequence, volume in volumes.items():
                write_volume(volume, folder / f"{sequence}.nii.gz")
                writer.writerow([study_id, split, sequence, f"studies/{study_id}/{sequence}.nii.gz", report,
                                 *(int(flags.get(label, 0)) for label in labels)])
    return table


def write_phantom_medmom(root: str | Path, seeds: Mapping[str, Sequence[int]],
                         sequences: Sequence[str] = MR_SEQUENCES, shape=None) -> Path:
    """A MedMoM dataset of synthetic MRI studies: ``seeds`` maps each split to phantom seeds."""
    import numpy as np

    from .phantoms import make_mr_study
    from .reports import write_report

    def studies():
        for split, split_seeds in seeds.items():
            for seed in split_seeds:
                study = make_mr_study(seed, sequences, shape=shape)
                report = write_report(study.truth, np.random.default_rng(seed))
                yield f"mr{seed:06d}", split, study.volumes, report, {pair: 1 for pair in study.truth.pairs}

    return write_medmom(root, studies(), PHANTOM_LABELS)
