"""M3D-Cap / M3D-VQA datasets: writers (from phantoms) and readers (ours and the real ones).

Layout under a data root, with the relative paths the official M3D and Med3DVLM training
scripts use by default (their ``--data_root``):

    M3D_Cap_npy/M3D_Cap.json       {"train": [{"image": rel, "text": rel}], "validation": [...],
                                    "test": [...]}; "text" names a .txt file under the root
    M3D_Cap_npy/ct_case/000001/Axial_non_contrast.nii.gz   + text.txt   (MR: mr_case/...,
                                    one file per sequence, e.g. Axial_T2.nii.gz)
    M3D-VQA/M3D_VQA_{train,val,test}.csv        closed questions, the M3D-VQA columns
    M3D-VQA/M3D_VQA_open_{train,val,test}.csv   open-only questions, same columns, no choices
    labels.json                    per-case findings, per-organ abnormality labels, sequences
    manifest.json                  seed, generator version, counts, file names

Volumes are written in their native geometry (not preprocessed), as a scanner export would be.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import Med3DVLMError
from ..readers import write_volume
from ..volume import MR_SEQUENCES
from .lesions import ABNORMALITIES, ORGANS
from .phantoms import CT_PHASES, GENERATOR_VERSION, LABELS, make_ct_phantom, make_mr_study
from .questions import QUESTION_TYPES, closed_questions, open_questions
from .reports import write_report

VQA_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B",
               "Choice C", "Choice D", "Answer", "Answer Choice")
CAP_JSON = "M3D_Cap_npy/M3D_Cap.json"
SPLITS = ("train", "validation", "test")
_CSV_SPLIT = {"train": "train", "validation": "val", "test": "test"}
# File names in the style of M3D-Cap ("Axial_C__portal_venous_phase.npy"), one per CT phase.
_CT_FILE = dict(zip(CT_PHASES, ("Axial_non_contrast", "Axial_C__portal_venous_phase")))


@dataclass(frozen=True)
class CapItem:
    image_path: Path
    text: str


@dataclass(frozen=True)
class VQAItem:
    image_path: Path
    text: str                       # the case's report ("" when the file has no Text column)
    question_type: int | str        # M3D: 1 plane, 2 phase, 3 organ, 4 abnormality, 5 location
    question: str
    choices: tuple[str, ...]        # four choices, or () for an open-only question
    answer: str
    answer_choice: str | None       # "A".."D", or None for an open-only question

    @property
    def closed(self) -> bool:
        return len(self.choices) == 4 and self.answer_choice is not None


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case ``index`` of a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _split_counts(n: int, splits) -> dict[str, int]:
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions, got {splits!r}")
    total = float(sum(splits))
    val, test = (int(round(n * f / total)) for f in splits[1:])
    return {"train": n - val - test, "validation": val, "test": test}


def _vqa_row(image: str, text: str, q: dict) -> dict:
    choices = q.get("choices", ["", "", "", ""])
    return dict(zip(VQA_COLUMNS, [image, text, q["type"], q["question"], *choices, q["answer"],
                                  q.get("answer_choice", "")]))


def written_cases(root, seed: int, modality: str = "CT") -> int:
    """How many cases of ``seed`` the dataset at ``root`` holds, as this generator writes them
    (0 when it is missing or from another seed, modality or generator): its first cases are
    the same for any ``n``, so a caller that needs ``n`` of them reuses a folder holding as many."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        return 0
    made = json.loads(manifest.read_text(encoding="utf-8"))
    same = (made.get("seed"), made.get("modality"), made.get("generator_version")) == (seed, modality,
                                                                                       GENERATOR_VERSION)
    return int(made.get("n", 0)) if same else 0


def write_dataset(outdir, n: int, seed: int, modality: str = "CT", splits=(0.8, 0.1, 0.1),
                  progress: bool = True, *, shape=None, sequences=MR_SEQUENCES) -> dict:
    """Write ``n`` phantom cases as an M3D-style dataset; returns the manifest."""
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    root = Path(outdir)
    counts = _split_counts(n, splits)
    split_of = [s for s in SPLITS for _ in range(counts[s])]
    sequences = tuple(sequences) if modality == "MR" else ()
    cap = {s: [] for s in SPLITS}
    vqa = {(s, kind): [] for s in SPLITS for kind in ("closed", "open")}
    cases = []
    for index in tqdm(range(n), desc=f"phantoms ({modality})", disable=not progress):
        cseed, split = case_seed(seed, index), split_of[index]
        folder = f"M3D_Cap_npy/{modality.lower()}_case/{index + 1:06d}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        if modality == "CT":
            phantom = make_ct_phantom(cseed, shape=shape)
            truth, volumes = phantom.truth, {_CT_FILE[phantom.truth.phase]: phantom.volume}
        else:
            study = make_mr_study(cseed, sequences, shape=shape)
            truth, volumes = study.truth, {f"Axial_{s}": v for s, v in study.volumes.items()}
        rng = np.random.default_rng([cseed, 1])
        report = write_report(truth, rng)
        (root / folder / "text.txt").write_text(report, encoding="utf-8")
        images = {}
        for name, volume in volumes.items():
            rel = f"{folder}/{name}.nii.gz"
            write_volume(volume, root / rel)
            images[rel] = {"sequence": volume.sequence, "phase": truth.phase,
                           "orientation": volume.metadata["orientation"]}
            cap[split].append({"image": rel, "text": f"{folder}/text.txt"})
            for kind, ask in (("closed", closed_questions), ("open", open_questions)):
                vqa[split, kind] += [_vqa_row(rel, report, q)
                                     for q in ask(truth, rng, sequence=volume.sequence)]
        cases.append({"case": f"{index + 1:06d}", "split": split, "seed": cseed, "images": images,
                      **{k: v for k, v in truth.to_json().items() if k != "label_table"}})
    files = _write_tables(root, cap, vqa)
    labels = {"organs": list(ORGANS), "abnormalities": list(ABNORMALITIES),
              "label_table": {str(k): v for k, v in LABELS.items()}, "cases": cases}
    (root / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
    manifest = {"dataset": "med3dvlm synthetic phantoms (M3D layout)",
                "generator": "med3dvlm.data.phantoms", "generator_version": GENERATOR_VERSION,
                "seed": seed, "n": n, "modality": modality, "sequences": list(sequences),
                "shape": list(shape) if shape else None, "splits": counts,
                "question_types": QUESTION_TYPES, "files": {**files, "labels": "labels.json"},
                "case_seed": "numpy SeedSequence([seed, case_index]).generate_state(1, uint64)"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _write_tables(root: Path, cap: dict, vqa: dict) -> dict:
    (root / "M3D-VQA").mkdir(parents=True, exist_ok=True)
    (root / CAP_JSON).write_text(json.dumps(cap, indent=1), encoding="utf-8")
    files: dict = {"cap": CAP_JSON, "vqa": {}, "vqa_open": {}}
    for split in SPLITS:
        for kind, key, stem in (("closed", "vqa", "M3D_VQA"), ("open", "vqa_open", "M3D_VQA_open")):
            rel = f"M3D-VQA/{stem}_{_CSV_SPLIT[split]}.csv"
            with open(root / rel, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=VQA_COLUMNS)
                writer.writeheader()
                writer.writerows(vqa[split, kind])
            files[key][split] = rel
    return files


def _data_root(table: Path, first_rel: str | None, data_root) -> Path:
    """The folder that relative paths are resolved against: given, or found by trying."""
    if data_root is not None:
        return Path(data_root)
    candidates = [table.parent.parent, table.parent]
    if first_rel:
        for root in candidates:
            if (root / first_rel).exists():
                return root
    return candidates[0]


def read_cap(json_path, split: str = "train", data_root=None) -> list[CapItem]:
    """Image-report pairs of one split of an M3D-Cap json ("val" means "validation")."""
    path = Path(json_path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Med3DVLMError(f"Cannot read the M3D-Cap file {path}: {exc}.") from exc
    split = {"val": "validation"}.get(split, split)
    if not isinstance(table, dict) or split not in table:
        found = sorted(table) if isinstance(table, dict) else type(table).__name__
        raise Med3DVLMError(f"{path} has no split {split!r} (it has {found}); pass one of those.")
    entries = table[split]
    root = _data_root(path, entries[0]["text"] if entries else None, data_root)
    items = []
    for entry in entries:
        text = entry["text"]
        if text.endswith(".txt"):                      # real M3D: a path to the report file
            text_path = root / text
            if not text_path.is_file():
                raise Med3DVLMError(f"Report file {text_path} listed in {path} does not exist; "
                                    "pass the dataset's data_root.")
            text = text_path.read_text(encoding="utf-8").strip()
        items.append(CapItem(root / entry["image"], text))
    return items


def read_vqa(csv_path, data_root=None) -> list[VQAItem]:
    """Rows of an M3D-VQA csv (closed or open-only); image paths resolved against the root."""
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Med3DVLMError(f"Cannot read the M3D-VQA file {path}: {exc}.") from exc
    missing = [c for c in ("Image Path", "Question", "Answer") if rows and c not in rows[0]]
    if missing:
        raise Med3DVLMError(f"{path} lacks the M3D-VQA column(s) {missing}.")
    root = _data_root(path, rows[0]["Image Path"] if rows else None, data_root)
    items = []
    for row in rows:
        choices = tuple(row.get(f"Choice {c}") or "" for c in "ABCD")
        qtype = (row.get("Question Type") or "").strip()
        items.append(VQAItem(
            image_path=root / row["Image Path"], text=row.get("Text") or "",
            question_type=int(qtype) if qtype.isdigit() else qtype, question=row["Question"],
            choices=choices if all(choices) else (), answer=row["Answer"],
            answer_choice=(row.get("Answer Choice") or "").strip() or None))
    return items


def write_samples(outdir, ct_seed: int = 2040, mr_seed: int = 2031) -> list[Path]:
    """Small sample files: a CT phantom and the T2 of an MR study, each with report and truth.

    The default seeds give a portal-venous CT with a liver cyst and a lung mass, and a T2 image
    with a large liver cyst.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ct = make_ct_phantom(ct_seed, n_findings=2)
    mr = make_mr_study(mr_seed, ("T2",), n_findings=1)
    written = []
    for stem, volume, truth in (("ct_phantom", ct.volume, ct.truth),
                                ("mr_phantom_t2", mr.volumes["T2"], mr.truth)):
        write_volume(volume, out / f"{stem}.nii.gz")
        report = write_report(truth, np.random.default_rng([truth.seed, 1]))
        (out / f"{stem}_report.txt").write_text(report + "\n", encoding="utf-8")
        meta = {**truth.to_json(), "file": f"{stem}.nii.gz", "sequence": volume.sequence,
                "orientation": volume.metadata["orientation"],
                "n_findings": len(truth.findings),
                "made_with": f"med3dvlm.data.m3d.write_samples(outdir, {ct_seed}, {mr_seed})"}
        (out / f"{stem}_truth.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        written += [out / f"{stem}{suffix}" for suffix in (".nii.gz", "_report.txt", "_truth.json")]
    return written
