"""The `med3dvlm` command line as a user runs it (in-process through `main`)."""

import json

import numpy as np
import pytest

from med3dvlm.cli import main
from med3dvlm.readers import write_volume
from med3dvlm.resources import sample_path
from med3dvlm.volume import Volume

CT = str(sample_path("ct_phantom.nii.gz"))
MR = str(sample_path("mr_phantom_t2.nii.gz"))


def test_info_describes_both_samples(capsys):
    assert main(["info", CT, MR]) == 0
    out = capsys.readouterr().out
    assert "modality:     CT" in out and "modality:     MR (T2)" in out
    assert "orientation:" in out and "spacing:" in out
    assert "resize" in out and "128 x 256 x 256" in out


def test_report_streams_text_to_stdout(capsys):
    assert main(["report", CT]) == 0
    out = capsys.readouterr().out
    assert len(out.split()) > 10


def test_report_many_volumes_to_json_files(tmp_path, capsys):
    assert main(["report", CT, MR, "--format", "json", "--output-dir", str(tmp_path), "--max-new-tokens", "20"]) == 0
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*_phantom*.json"))]
    assert [r["volume"] for r in records] == [CT, MR]
    assert all(r["model"] == "demo" and r["report"] and r["provenance"]["weights_blake2b"] for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["reported"] == 2


def test_ask_closed_question_prints_a_choice(capsys):
    assert main(["ask", CT, "How many abnormal findings are present?", "--choices", "None", "One", "Two", "Three"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer in {"A. None", "B. One", "C. Two", "D. Three"}


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("med3dvlm: error:") and "missing.nii.gz" in err and "Traceback" not in err

    flat = tmp_path / "slice.nii.gz"
    write_volume(Volume(np.random.default_rng(0).normal(size=(32, 32, 1)).astype(np.float32), np.eye(4)), flat)
    assert main(["info", str(flat)]) == 2
    assert "2D" in capsys.readouterr().err

    assert main(["report", CT, "--model", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_phantom_evaluation_json_says_what_produced_it(ct_dataset, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(ct_dataset), "-n", "2", "--json", str(out), "--device", "cpu",
                 "--probe-fit", "0", "--work", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    made = results["provenance"]
    assert made["task"] == "evaluate" and made["model"] == "demo" and made["seconds"] > 0
    # the per-question accuracies add up to the overall one, and name no organ
    by_question = results["closed_vqa_by_question"]
    assert sum(q["n"] for q in by_question.values()) == results["closed_vqa_questions"]
    assert sum(q["n"] * q["accuracy"] for q in by_question.values()) == pytest.approx(
        results["closed_vqa_accuracy"] * results["closed_vqa_questions"], abs=0.01)
    assert not any(organ in template for template in by_question for organ in ("liver", "spleen", "left kidney"))
    # the findings missed by pair add up to those the recall did not find
    missed = sum(e["missed"] for e in results["report_errors_by_pair"].values())
    assert missed == round(results["report_findings"] * (1 - results["report_recall"]))


def test_evaluation_writes_more_phantoms_when_asked_for_more_than_its_folder_holds(tmp_path):
    out = tmp_path / "eval.json"
    common = ["--seed", "9", "--probe-fit", "0", "--work", str(tmp_path), "--device", "cpu", "--json", str(out)]
    assert main(["evaluate", "-n", "1", *common]) == 0
    assert main(["evaluate", "-n", "2", *common]) == 0  # the folder of 1 phantom is not enough
    assert json.loads(out.read_text())["n_volumes"] == 2
    manifest = tmp_path / "eval-phantoms-seed9" / "manifest.json"
    made = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**made, "generator_version": "0.1"}))  # phantoms of an older generator
    assert main(["evaluate", "-n", "1", *common]) == 0
    assert json.loads(manifest.read_text())["generator_version"] == made["generator_version"]


def test_evaluation_refuses_to_fit_the_probe_on_the_phantoms_it_scores(capsys, tmp_path):
    assert main(["evaluate", "--seed", "5", "--probe-fit", "5", "--work", str(tmp_path)]) == 2
    assert "--probe-fit must differ from --seed" in capsys.readouterr().err


def test_detect_json_carries_scores_and_provenance(capsys):
    assert main(["detect", MR, "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["scores"] and record["provenance"]["task"] == "detect"
    (applied,) = record["provenance"]["preprocessing"]["volumes"]  # the detector's own preprocessing of MR
    assert applied["sequence"] == "T2" and applied["intensity"] == "percentile" and applied["steps"]


def test_evaluate_refuses_to_run_once_per_rank(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "-n", "2"]) == 2  # the phantom evaluation (evaluate m3d shares its work)
    assert "start it without torchrun" in capsys.readouterr().err


def test_deterministic_is_refused_with_a_server(capsys):
    assert main(["ask", CT, "What is seen?", "--deterministic", "--server", "http://127.0.0.1:9"]) == 2
    assert "--deterministic applies to a model in this process" in capsys.readouterr().err


def test_retrieve_takes_reports_as_text_of_any_length_or_as_files(capsys, tmp_path):
    true_report = sample_path("ct_phantom_report.txt").read_text().strip()  # longer than a file name may be
    other = tmp_path / "other.txt"
    other.write_text("Findings: No abnormality. Impression: Normal study.")
    assert main(["retrieve", CT, true_report, str(other), "--device", "cpu"]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert true_report[:60] in first and "No abnormality" in second
