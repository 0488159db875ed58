"""How visible each phantom finding is at a model's input: contrast-to-noise ratio and size.

Measured on the preprocessed input (reorientation, window or percentiles, crop and resize as the
model sees it), with the finding and organ masks carried through the very same steps
(``preprocess.carry``). For one finding:

- lesion: model voxels at least half inside the finding; ``voxels``: summed occupancy;
- background: the organ's parenchyma (voxels at least 99 % inside the finding's organ, not
  touching any finding) within 4 voxels in-plane and one slice of the lesion, or the whole
  parenchyma when fewer than 30 voxels are that close (fluid lies outside its organ, so its
  background is the organ it borders);
- CNR = (lesion mean - background median) / background robust SD (1.4826 x median absolute
  deviation, at least 0.01 of the intensity range), so partial volume with a rib or the organ's
  edge does not count as noise; negative: darker than the organ.

``python -m med3dvlm.data.conspicuity`` prints (or writes) the table per (organ, kind) and CT
phase, and for MRI per study (each finding on its most conspicuous sequence) and per sequence
at the MedMAP demo detector's input. The floor applies to CT and to MRI studies.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import DEMO, PreprocessConfig, carry, preprocess
from ..volume import MR_SEQUENCES, Volume
from .anatomy import LABEL_OF
from .phantoms import GENERATOR_VERSION, GroundTruth, make_ct_phantom, make_mr_study

MIN_CNR, MIN_VOXELS = 3.0, 8.0
MR_INPUT = PreprocessConfig(shape=(32, 64, 64))  # the MedMAP demo detector's input


def _dilate(mask: torch.Tensor, depth: int, plane: int) -> torch.Tensor:
    kernel = (2 * depth + 1, 2 * plane + 1, 2 * plane + 1)
    return F.max_pool3d(mask[None, None].float(), kernel, 1, (depth, plane, plane))[0, 0] > 0


def finding_rows(volume: Volume, truth: GroundTruth, config: PreprocessConfig) -> list[dict]:
    """One row per finding of ``truth``: organ, kind, cnr, voxels (at ``config``'s input)."""
    image = preprocess(volume, config)[0]
    organs = sorted({f.organ for f in truth.findings})
    masks = [truth.finding_map == i + 1 for i in range(len(truth.findings))]
    masks += [truth.label_map == LABEL_OF[organ] for organ in organs]
    occupancy = carry(volume, np.stack(masks).astype(np.float32), config)
    findings = occupancy[:len(truth.findings)]
    rows = []
    for i, finding in enumerate(truth.findings):
        lesion = findings[i] >= 0.5
        parenchyma = (occupancy[len(truth.findings) + organs.index(finding.organ)] >= 0.99) \
            & ~_dilate(findings.sum(0) > 0.1, 1, 1)
        ring = parenchyma & _dilate(lesion, 1, 4)
        background = image[ring if ring.sum() >= 30 else parenchyma]
        row = {"organ": finding.organ, "kind": finding.kind, "voxels": float(findings[i].sum()), "cnr": float("nan")}
        if lesion.any() and background.numel() >= 10:
            centre = background.median()
            spread = (1.4826 * (background - centre).abs().median()).clamp_min(0.01)
            row["cnr"] = float((image[lesion].mean() - centre) / spread)
        rows.append(row)
    return rows


def measure(seeds: Iterable[int], modality: str = "CT", config: PreprocessConfig | None = None,
            sequences: Sequence[str] = MR_SEQUENCES, n_findings: int = 4) -> list[dict]:
    """Rows for every finding of phantoms ``seeds`` (``n_findings`` each), with ``group``:
    the CT phase, or the MRI sequence."""
    rows = []
    for seed in seeds:
        if modality == "CT":
            phantom = make_ct_phantom(seed, n_findings=n_findings)
            rows += [{**r, "group": phantom.truth.phase, "finding": (seed, i)}
                     for i, r in enumerate(finding_rows(phantom.volume, phantom.truth, config or DEMO))]
        else:
            study = make_mr_study(seed, sequences, n_findings=n_findings)
            for sequence, volume in study.volumes.items():
                rows += [{**r, "group": sequence, "finding": (seed, i)}
                         for i, r in enumerate(finding_rows(volume, study.truth, config or MR_INPUT))]
    return rows


def table(rows: Sequence[dict]) -> list[dict]:
    """Per (group, organ, kind): n, median CNR, smallest |CNR|, median and smallest voxels."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["group"], row["organ"], row["kind"])].append(row)
    out = []
    for (group, organ, kind), members in sorted(groups.items()):
        cnr = np.array([m["cnr"] for m in members])
        voxels = np.array([m["voxels"] for m in members])
        out.append({"group": group, "organ": organ, "kind": kind, "n": len(members),
                    "cnr_median": float(np.median(cnr)), "cnr_min_abs": float(np.min(np.abs(cnr))),
                    "voxels_median": float(np.median(voxels)), "voxels_min": float(voxels.min())})
    return out


def best_of_study(rows: Sequence[dict]) -> list[dict]:
    """One row per finding of an MRI study: its largest |CNR| over the study's sequences (group
    "best sequence"), as a reader reads a study; voxels are the same in every sequence."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = row["finding"]
        if key not in best or abs(row["cnr"]) > abs(best[key]["cnr"]) or np.isnan(best[key]["cnr"]):
            best[key] = {**row, "group": "best sequence"}
    return list(best.values())


def failing(summary: Sequence[dict]) -> list[dict]:
    """Rows below the conspicuity floor (|CNR| >= 3 and >= 8 voxels for every finding)."""
    return [r for r in summary if not (r["cnr_min_abs"] >= MIN_CNR and r["voxels_min"] >= MIN_VOXELS)]


def markdown(summary: Sequence[dict], title: str) -> str:
    lines = [f"### {title}", "", "| phase / sequence | organ | kind | n | CNR median | min abs CNR "
             "| voxels median | voxels min |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['organ']} | {r['kind']} | {r['n']} | {r['cnr_median']:.1f} | "
              f"{r['cnr_min_abs']:.1f} | {r['voxels_median']:.0f} | {r['voxels_min']:.0f} |" for r in summary]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure how visible the phantoms' findings are at the "
                                                 "demo models' input (CNR against the organ, size in voxels).")
    parser.add_argument("-n", type=int, default=40, help="phantoms per modality (4 findings each)")
    parser.add_argument("--seed", type=int, default=777_000, help="first phantom seed")
    parser.add_argument("--markdown", type=Path, help="write the tables to this file")
    args = parser.parse_args(argv)
    seeds = range(args.seed, args.seed + args.n)
    mr_rows = measure(seeds, "MR")
    ct, mr, mr_best = table(measure(seeds, "CT")), table(mr_rows), table(best_of_study(mr_rows))
    text = (f"Phantom generator {GENERATOR_VERSION}; {args.n} phantoms per modality (seeds {args.seed}.."
            f"{args.seed + args.n - 1}, 4 findings each). Floor: |CNR| >= {MIN_CNR:g} and >= {MIN_VOXELS:g} "
            f"voxels for every finding.\n\n"
            + markdown(ct, f"CT at the demo input {' x '.join(map(str, DEMO.shape))} (abdomen window)") + "\n"
            + markdown(mr_best, "MRI studies: each finding on its most conspicuous sequence") + "\n"
            + markdown(mr, f"MRI at the MedMAP demo input {' x '.join(map(str, MR_INPUT.shape))} (percentiles), "
                           "per sequence (a finding need not show on every sequence)"))
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    below = failing(ct) + failing(mr_best)
    for row in below:
        print(f"below the floor: {row['group']} {row['organ']} {row['kind']}: min |CNR| "
              f"{row['cnr_min_abs']:.1f}, min voxels {row['voxels_min']:.0f}")
    return 1 if below else 0


if __name__ == "__main__":
    raise SystemExit(main())
