"""Summary of an M3D benchmark run: the paper's metrics, per question type, settings, a table."""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .._version import __version__
from .jsonl import read_records, rewrite
from .m3d_bench import M3DBenchmark
from .text_metrics import bert_score

QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
TEXT_METRICS = ("bleu1", "rouge1", "rougeL", "meteor", "bertscore_f1")
LABELS = {"bleu1": "BLEU-1", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR", "bertscore_f1": "BERTScore"}


def _type_name(qtype) -> str:
    return QUESTION_TYPES.get(qtype, str(qtype))


def _in_type_order(by_type: dict) -> list:
    order = list(QUESTION_TYPES.values())
    return sorted(by_type.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def _means(records: list[dict]) -> dict[str, float]:
    return {m: float(np.mean([r[m] for r in records])) for m in TEXT_METRICS if records and m in records[0]}


def _add_bertscore(bench: M3DBenchmark, task: str, records: list[dict]) -> None:
    """BERTScore over the whole set at once (batched), kept in the JSONL so a rerun reuses it."""
    cfg = bench.cfg
    todo = [r for r in records if "bertscore_f1" not in r]
    if cfg.bertscore_model is None or not todo:
        return
    scores = bert_score([r["prediction"] for r in todo], [r["reference"] for r in todo], cfg.bertscore_model,
                        num_layers=cfg.bertscore_layers, device=str(bench.pipe.device))
    for record, f1 in zip(todo, scores):
        record["bertscore_f1"] = f1
    path = cfg.out / f"{task}.jsonl"
    everything = read_records(path)
    everything.update({r["id"]: r for r in records})
    rewrite(path, list(everything.values()))


def summarize(bench: M3DBenchmark, results: dict[str, list[dict]]) -> dict:
    cfg, pipe = bench.cfg, bench.pipe
    metrics: dict = {}
    if "retrieval" in results:
        recall, ranks = M3DBenchmark.retrieval_scores(results["retrieval"])
        metrics["retrieval"] = {"n": len(ranks), **recall}
        (cfg.out / "retrieval_ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranks))
    for task in ("report", "vqa_open"):
        if task in results:
            _add_bertscore(bench, task, results[task])
            records = results[task]
            metrics[task] = {"n": len(records), **_means(records)}
            if task == "vqa_open":
                by_type = defaultdict(list)
                for r in records:
                    by_type[_type_name(r["question_type"])].append(r)
                metrics[task]["by_type"] = {t: {"n": len(rs), **_means(rs)} for t, rs in _in_type_order(by_type)}
    if "vqa_closed" in results:
        records = results["vqa_closed"]
        by_type = defaultdict(list)
        for r in records:
            by_type[_type_name(r["question_type"])].append(r["correct"])
        metrics["vqa_closed"] = {"n": len(records),
                                 "accuracy": float(np.mean([r["correct"] for r in records])) if records else float("nan"),
                                 "by_type": {t: {"n": len(v), "accuracy": float(np.mean(v))}
                                             for t, v in _in_type_order(by_type)}}
    notes = [f"{task} skipped: {why}" for task, why in bench.skipped.items()]
    if not bench.meteor.synonyms:
        notes.append("METEOR ran without WordNet synonyms (exact and stem matches only): a lower bound, "
                     "not comparable with the paper's METEOR. " + bench.meteor.note)
    if cfg.bertscore_model is None:
        notes.append("BERTScore not computed: pass a local scorer model folder (the paper: roberta-large, layer 17).")
    return {
        "benchmark": "M3D (Med3DVLM paper tasks)", "created": datetime.datetime.now().astimezone().isoformat(),
        "package_version": __version__, "model": pipe.model_name, "provenance": pipe.provenance("evaluate"),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""), "quantization": pipe.quantization,
        "data": {"root": str(cfg.root), "split": cfg.split, "cap_json": str(cfg.cap_json),
                 "vqa_csv": str(cfg.vqa_csv), "vqa_open_csv": str(cfg.vqa_open_csv) if cfg.vqa_open_csv else None,
                 "n": cfg.n, "n_vqa": cfg.n_vqa},
        "settings": {"report_generation": asdict(bench.report_settings),
                     "answer_generation": asdict(bench.answer_settings), "closed_vqa": cfg.closed_mode,
                     "report_prompt": "Describe the findings of the medical image you see.",
                     "meteor": bench.meteor.settings(),
                     "bertscore": {"model": str(cfg.bertscore_model) if cfg.bertscore_model else None,
                                   "layers": cfg.bertscore_layers, "idf": False, "rescale": False},
                     "retrieval_ties": "count against the true match"},
        "metrics": metrics, "notes": notes,
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:6.2f}"


def format_table(summary: dict) -> str:
    """The paper's rows: retrieval R@K both ways, text metrics of reports and open VQA, closed accuracy."""
    m, lines = summary["metrics"], []
    meteor = "METEOR" if summary["settings"]["meteor"]["synonyms"] else "METEOR*"
    if "retrieval" in m:
        r = m["retrieval"]
        lines += [f"Image-text retrieval (n={r['n']})        R@1    R@5   R@10",
                  f"  image -> text                     {_pct(r['image_to_text_R@1'])} {_pct(r['image_to_text_R@5'])} "
                  f"{_pct(r['image_to_text_R@10'])}",
                  f"  text -> image                     {_pct(r['text_to_image_R@1'])} {_pct(r['text_to_image_R@5'])} "
                  f"{_pct(r['text_to_image_R@10'])}"]
    header = "".join(f"{(meteor if k == 'meteor' else LABELS[k]):>10s}" for k in TEXT_METRICS)
    for task, title in (("report", "Report generation"), ("vqa_open", "Open VQA")):
        if task in m:
            t = m[task]
            label = f"{title} (n={t['n']})"
            lines += [f"{label:34s}{header}",
                      f"  {'all':32s}" + "".join(f"{_pct(t.get(k)):>10s}" for k in TEXT_METRICS)]
            for name, row in t.get("by_type", {}).items():
                label = f"{name} (n={row['n']})"
                lines.append(f"  {label:32s}" + "".join(f"{_pct(row.get(k)):>10s}" for k in TEXT_METRICS))
    if "vqa_closed" in m:
        c = m["vqa_closed"]
        lines += [f"Closed VQA accuracy (n={c['n']}, {summary['settings']['closed_vqa']})", f"  {'all':32s}{_pct(c['accuracy'])}"]
        for name, row in c["by_type"].items():
            label = f"{name} (n={row['n']})"
            lines.append(f"  {label:32s}{_pct(row['accuracy'])}")
    lines += [f"note: {n}" for n in summary["notes"]]
    if meteor.endswith("*"):
        lines.append("* METEOR without WordNet synonyms")
    return "\n".join(lines)


def write_summary(summary: dict, out: Path) -> Path:
    path = Path(out) / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path
