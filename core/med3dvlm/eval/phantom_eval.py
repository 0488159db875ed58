"""Accuracy of a model on phantoms it never saw: closed VQA, retrieval, and report findings.

- closed VQA: share of closed (A-D) questions whose chosen answer is the right one, overall and
  per question (``closed_vqa_by_question``: organ and abnormality names replaced by placeholders);
- retrieval: image-to-report and report-to-image R@1/R@5 among ``n`` volumes (SigLIP towers);
- reports: recall = share of true (organ, abnormality) findings the generated report states;
  false mentions = share of stated findings that are not in the ground truth; per organ x kind,
  the findings missed and invented (``report_errors_by_pair``);
- image-token probe (with ``probe_fit``): a linear probe on the projector's image tokens, fitted on
  other phantoms, tells organ x kind on these (``eval.probe``; macro AUC).
Findings are read from reports with ``data.reports.mentioned_findings``, the parser the phantom
report writer round-trips with.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.lesions import ABNORMALITIES, ORGANS, PAIRS, present
from ..data.m3d import CAP_JSON, read_cap, read_vqa
from ..data.reports import mentioned_findings
from .probe import probe_auc, token_features
from .retrieval import recall_at_k


def truth_pairs(data_root: Path) -> dict[str, set[tuple[str, str]]]:
    """Image path -> set of (organ, kind) from the dataset's labels.json."""
    labels = json.loads((data_root / "labels.json").read_text())
    out = {}
    for case in labels["cases"]:
        pairs = {(f["organ"], f["kind"]) for f in case["findings"]}
        for image in case["images"]:
            out[str(data_root / image)] = pairs
    return out


# Longest names first, so "left kidney" is replaced before "kidney" could be.
_NAMES = re.compile("|".join(sorted((re.escape(w) for w in ORGANS + ABNORMALITIES), key=len, reverse=True)))


def question_template(question: str) -> str:
    """The question with its organ and abnormality names as placeholders: "Is there a cyst in the
    liver?" -> "Is there a <name> in the <name>?"."""
    return _NAMES.sub("<name>", question)


def token_probe(pipe, fit_root: Path, fit_n: int, images: list[str], truths: dict) -> dict:
    """``eval.probe`` on the projector's image tokens: fitted on ``fit_root``'s first ``fit_n``
    phantoms, scored on ``images``."""
    import torch

    fit_images = [str(c.image_path) for c in read_cap(fit_root / CAP_JSON, "train")[:fit_n]]
    fit_truths = truth_pairs(fit_root)

    def stack(paths, truth):
        features = torch.cat([token_features(pipe.encode(p).float().cpu()) for p in paths])
        return features, torch.stack([present(truth[p]) for p in paths])

    return probe_auc(*stack(fit_images, fit_truths), *stack(images, truths), names=[f"{o}/{k}" for o, k in PAIRS])


def evaluate_phantoms(pipe, data_root: str | Path, split: str = "train", n: int = 100,
                      progress: bool = True, probe_fit: Path | None = None, probe_fit_n: int = 300) -> dict:
    """``probe_fit``: a phantom dataset (other seed) to fit the image-token probe on; None skips it."""
    root = Path(data_root)
    caps = read_cap(root / CAP_JSON, split)[:n]
    images = {str(c.image_path) for c in caps}
    csv_split = {"validation": "val"}.get(split, split)
    closed = [q for q in read_vqa(root / "M3D-VQA" / f"M3D_VQA_{csv_split}.csv") if str(q.image_path) in images]

    by_question = defaultdict(list)
    for q in tqdm(closed, desc="closed VQA", disable=not progress):
        answer = pipe.ask(q.image_path, q.question, choices=list(q.choices))
        by_question[question_template(q.question)].append(answer.startswith(f"{q.answer_choice}."))
    correct = sum(sum(v) for v in by_question.values())
    results = {"n_volumes": len(caps), "closed_vqa_questions": len(closed),
               "closed_vqa_accuracy": correct / max(len(closed), 1),
               "closed_vqa_by_question": {t: {"n": len(v), "accuracy": round(float(np.mean(v)), 3)}
                                          for t, v in sorted(by_question.items())}}

    if pipe.retrieval is not None:
        similarity = pipe.similarities([c.image_path for c in caps], [c.text for c in caps]).numpy()
        results.update(recall_at_k(similarity, (1, 5)))

    truths = truth_pairs(root)
    bar = tqdm(total=len(caps), desc="reports", disable=not progress)
    reports = pipe.report_batch([c.image_path for c in caps], batch_size=8, progress=bar.update)
    bar.close()
    said = [mentioned_findings(report) for report in reports]
    truth = [truths[str(cap.image_path)] for cap in caps]
    true_total, stated = sum(map(len, truth)), sum(map(len, said))
    results.update({"report_findings": true_total,
                    "report_recall": sum(len(t & s) for t, s in zip(truth, said)) / max(true_total, 1),
                    "report_false_mention_rate": sum(len(s - t) for t, s in zip(truth, said)) / max(stated, 1),
                    "reports_with_invented_finding": float(np.mean([bool(s - t) for t, s in zip(truth, said)])),
                    "report_errors_by_pair": report_errors_by_pair(truth, said),
                    "example_report": reports[0]})
    if probe_fit is not None:
        probe = token_probe(pipe, Path(probe_fit), probe_fit_n, [str(c.image_path) for c in caps], truths)
        results.update({"token_probe_macro_auc": probe["macro_auc"], "token_probe_pairs": probe["labels_scored"]})
    return results


def report_errors_by_pair(truths: list[set], said: list[set]) -> dict[str, dict[str, int]]:
    """Per organ x kind, over the reports: "missed" (true, not stated), "invented" (stated, not true)
    and, of the inventions, "in_place_of" (the report missed a true finding of the same organ or the
    same kind: a confusion, not a finding from nowhere). Only pairs with an error are listed."""
    errors = defaultdict(lambda: {"missed": 0, "invented": 0, "in_place_of": 0})
    for truth, stated in zip(truths, said):
        missed = truth - stated
        for organ, kind in missed:
            errors[f"{organ}/{kind}"]["missed"] += 1
        for organ, kind in stated - truth:
            errors[f"{organ}/{kind}"]["invented"] += 1
            errors[f"{organ}/{kind}"]["in_place_of"] += any(o == organ or k == kind for o, k in missed)
    return {pair: errors[pair] for pair in sorted(errors, key=lambda p: -sum(errors[p].values()))}


def summary_text(results: dict) -> str:
    """``evaluate_phantoms``'s results as the lines ``med3dvlm evaluate`` prints (provenance left out)."""
    lines = []
    for key, value in results.items():
        if key == "closed_vqa_by_question":
            lines += [key] + [f"  {template:58s} {score['accuracy']:.3f} of {score['n']}" for template, score in value.items()]
        elif key == "report_errors_by_pair":
            lines += [f"{key}  (missed / invented / of those, in place of a missed finding of its organ or kind)"]
            lines += [f"  {pair:58s} {e['missed']:3d} {e['invented']:3d} {e['in_place_of']:3d}" for pair, e in value.items()]
        elif key not in ("provenance", "example_report"):
            lines.append(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    return "\n".join(lines) + f"\n\nexample report:\n{results['example_report']}"
