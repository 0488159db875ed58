"""`med3dvlm evaluate-detection`: a MedMAP detector on a split of a MedMoM-layout dataset.

    med3dvlm evaluate-detection --model runs/medmap --data ROOT --split test [--json out.json]

Prints per-label AUC, balanced accuracy and F1 for the full study and each sequence alone.
"""

from __future__ import annotations

import json
from pathlib import Path


def cmd_evaluate_detection(args) -> None:
    import torch

    from ..detection import Detector
    from ..resources import demo_detector_dir
    from .detection_eval import evaluate_detector, format_reports, to_json

    if args.threads:
        torch.set_num_threads(args.threads)
    detector = Detector.load(demo_detector_dir() if args.model == "demo" else args.model, device=args.device)
    results = evaluate_detector(detector, args.data, args.split, progress=True)
    print(format_reports(results))
    if args.json:
        record = {"model": str(args.model), "data": str(args.data), "split": args.split, "subsets": to_json(results)}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


def add_detection_eval_parser(sub) -> None:
    p = sub.add_parser("evaluate-detection",
                       help="MRI abnormality detection (MedMAP) on a MedMoM-layout dataset: per-label AUC, "
                            "balanced accuracy, F1; full study and per sequence")
    p.add_argument("--model", default="demo", help="'demo' or a folder written by `med3dvlm train medmap`")
    p.add_argument("--data", required=True, help="root of a MedMoM-layout dataset (holding medmom.csv)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="(default: test)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=cmd_evaluate_detection)
