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
from .lesions import PAIRS

TABLE_NAME = "medmom.csv"
BASE_COLUMNS = ("study_id", "split", "sequence", "path", "report")
SPLITS = ("train", "validation", "test")
# Every (organ, kind) pair the phantoms can hold: 23 labels.
PHANTOM_LABELS = PAIRS


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


def phantom_mr_study(seed: int, sequences: Sequence[str], shape=None, findings: Sequence[int] | None = None):
    """``make_mr_study`` with ``findings`` (e.g. (2, 3, 4)) findings per study, cycling over seeds;
    None keeps the phantoms' own 0-2. Fewer when the anatomy has no room for that many."""
    from .phantoms import make_mr_study

    if not findings:
        return make_mr_study(seed, tuple(sequences), shape=shape)
    n = findings[seed % len(findings)]
    while True:
        try:
            return make_mr_study(seed, tuple(sequences), shape=shape, n_findings=n)
        except RuntimeError:
            n -= 1


def write_phantom_medmom(root: str | Path, seeds: Mapping[str, Sequence[int]],
                         sequences: Sequence[str] = MR_SEQUENCES, shape=None,
                         labels: Sequence[tuple[str, str]] = PHANTOM_LABELS,
                         findings: Mapping[str, Sequence[int]] | None = None) -> Path:
    """A MedMoM dataset of synthetic MRI studies: ``seeds`` maps each split to phantom seeds.

    ``labels`` chooses the label columns; ``findings`` maps a split to findings per study
    (see ``phantom_mr_study``), e.g. more positives in training than in the test split.
    """
    import numpy as np

    from .reports import write_report

    def studies():
        for split, split_seeds in seeds.items():
            for seed in split_seeds:
                study = phantom_mr_study(seed, sequences, shape, (findings or {}).get(split))
                report = write_report(study.truth, np.random.default_rng(seed))
                yield f"mr{seed:06d}", split, study.volumes, report, {pair: 1 for pair in study.truth.pairs}

    return write_medmom(root, studies(), labels)


def table_labels(studies: Sequence[MedMoMStudy]) -> tuple[tuple[str, str], ...]:
    """The label columns of a table, in column order."""
    return tuple(studies[0].labels)


def table_sequences(studies: Sequence[MedMoMStudy]) -> tuple[str, ...]:
    """The sequences any study holds, in ``MR_SEQUENCES`` order."""
    present = {seq for study in studies for seq in study.volumes}
    return tuple(s for s in MR_SEQUENCES if s in present)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m med3dvlm.data.medmom",
                                     description="Write MRI phantoms as a MedMoM-layout dataset.")
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=48, help="training studies (default: 48)")
    parser.add_argument("--validation", type=int, default=16, help="validation studies (default: 16)")
    parser.add_argument("--test", type=int, default=16, help="test studies (default: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", nargs="+", default=list(MR_SEQUENCES), choices=MR_SEQUENCES)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="phantom grid (default: full size)")
    parser.add_argument("--labels", nargs="+", help="label columns as organ/kind (default: all 23)")
    parser.add_argument("--findings", type=int, nargs="+", help="findings per study, cycled (default: 0-2)")
    args = parser.parse_args(argv)
    counts = {"train": args.train, "validation": args.validation, "test": args.test}
    start = args.seed * 1_000_000
    seeds, offset = {}, start
    for split, n in counts.items():
        seeds[split], offset = range(offset, offset + n), offset + n
    labels = [tuple(name.split("/", 1)) for name in args.labels] if args.labels else PHANTOM_LABELS
    unknown = [label_column(pair) for pair in labels if pair not in PHANTOM_LABELS]
    if unknown:
        parser.error(f"the phantoms hold no {unknown}; choose from {', '.join(map(label_column, PHANTOM_LABELS))}")
    findings = {split: args.findings for split in counts} if args.findings else None
    table = write_phantom_medmom(args.root, seeds, args.sequences, args.shape, labels, findings)
    print(f"wrote {sum(counts.values())} MRI phantom studies to {table}")


if __name__ == "__main__":
    main()
