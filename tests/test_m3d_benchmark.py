"""`med3dvlm evaluate m3d` on phantoms written in the M3D layouts, with the bundled demo model:
the real-benchmark code path end to end, its summary and table, and resuming after an interruption."""

import json

import torch

from med3dvlm.cli import main
from med3dvlm.eval.jsonl import read_records


def run(ct_dataset, out, capsys):
    torch.set_num_threads(1)
    code = main(["evaluate", "m3d", "--root", str(ct_dataset), "--out", str(out), "--split", "train", "-n", "4",
                 "--n-vqa", "4", "--max-new-tokens", "48", "--device", "cpu", "--threads", "1"])
    assert code == 0
    return capsys.readouterr().out


def test_evaluate_m3d_prints_the_papers_metrics_and_resumes(ct_dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    table = run(ct_dataset, out, capsys)
    for row in ("Image-text retrieval (n=4)", "R@10", "Report generation (n=4)", "BLEU-1", "ROUGE-1", "ROUGE-L",
                "METEOR", "Open VQA (n=8)", "Closed VQA accuracy (n=4, generate)"):
        assert row in table
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["retrieval"]["n"] == 4 and 0 <= m["retrieval"]["image_to_text_R@1"] <= 1
    assert m["retrieval"]["image_to_text_R@5"] == 1.0  # 4 candidates: the true one is always in the top 5
    assert set(m["report"]) >= {"n", "bleu1", "rouge1", "rougeL", "meteor"}
    assert sum(t["n"] for t in m["vqa_open"]["by_type"].values()) == 8  # 4 closed rows asked open + 4 open-only
    assert sum(t["n"] for t in m["vqa_closed"]["by_type"].values()) == 4
    settings = summary["settings"]
    assert settings["report_generation"]["do_sample"] is False and settings["report_generation"]["max_new_tokens"] == 48
    assert summary["model"] == "demo" and summary["dtype"] == "float32"
    assert summary["provenance"]["weights_blake2b"] and summary["provenance"]["package"].startswith("med3dvlm")
    closed = list(read_records(out / "vqa_closed.jsonl").values())
    assert all(r["correct"] == (f"{r['answer_choice']}." in r["prediction"]) for r in closed)
    assert m["vqa_closed"]["accuracy"] == sum(r["correct"] for r in closed) / 4

    # Interrupted during the reports: two finished lines and one cut short. A rerun redoes the
    # missing two and the cut one only, and keeps the finished ones as they were.
    path = out / "report.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    kept = [json.loads(line) for line in lines[:2]]
    path.write_text("".join(lines[:2]) + lines[2][:25])
    for line in kept:
        line_id = line["id"]
        assert line_id in read_records(path)
    run(ct_dataset, out, capsys)
    records = read_records(path)
    assert len(records) == 4 and [records[r["id"]] for r in kept] == kept
    assert json.loads((out / "summary.json").read_text())["metrics"]["report"]["n"] == 4
