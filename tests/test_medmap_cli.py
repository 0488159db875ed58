"""`med3dvlm train medmap` and `med3dvlm evaluate-detection` on MRI phantoms in the MedMoM layout:
a tiny model, a few seconds of training, the per-label table, resuming, and two torchrun ranks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from med3dvlm.cli import main
from med3dvlm.data.medmom import read_medmom, write_phantom_medmom
from med3dvlm.detection import STUDY_KEY, Detector
from med3dvlm.eval.classification import roc_auc
from med3dvlm.readers import read_volume

SEQUENCES = ("T1", "T2", "DWI")
LABELS = (("liver", "fluid"), ("liver", "cyst"), ("right kidney", "cyst"))
TINY = ["--input-size", "16", "32", "32", "--embed-dim", "32", "--text-width", "32", "--text-layers", "1",
        "--vocab-size", "400"]
COMMON = ["batch_size=8", "lr=3e-3", "warmup_steps=2", "progress=false", "log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("medmom")
    seeds = {"train": range(0, 32), "validation": range(100, 112), "test": range(200, 216)}
    write_phantom_medmom(root, seeds, SEQUENCES, shape=(64, 64, 16), labels=LABELS,
                         findings={"train": (4,), "validation": (3, 4), "test": (3, 4)})
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "medmap"
    code = main(["train", "medmap", "--data", str(data), "--out", str(out), *TINY, "--full-study-p", "1", *COMMON,
                 "pretrain.epochs=2", "finetune.epochs=5"])
    assert code == 0
    return out


def log_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_train_writes_a_detector_with_validation_thresholds(trained):
    detector = Detector.load(trained)
    assert detector.labels == LABELS and detector.sequences == SEQUENCES
    assert set(detector.thresholds) == {STUDY_KEY, *SEQUENCES}
    summary = json.loads((trained / "validation.json").read_text())
    assert summary["thresholds_from"] == "validation" and summary["studies"] == {"train": 32, "validation": 12}
    assert summary["thresholds"] == detector.thresholds
    assert summary["steps"] == {"pretrain": 8, "finetune": 20}  # 32 studies / 8 per step
    # The text tower was frozen while fine-tuning: the checkpoint holds no text-tower tensors.
    from safetensors.torch import load_file

    finetuned = load_file(str(trained / "finetune" / "checkpoint-last" / "model.safetensors"))
    assert finetuned and not any(k.startswith(("language_encoder.", "mm_language_proj.")) for k in finetuned)


def test_evaluate_detection_prints_per_label_figures_that_match_detect(trained, data, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate-detection", "--model", str(trained), "--data", str(data), "--split", "test",
                 "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    print(out)
    for title in ("== full study (all its sequences): 16 studies", "== T1 alone", "== T2 alone", "== DWI alone"):
        assert title in out
    assert "AUC" in out and "bal.acc" in out and "F1" in out
    assert out.count("liver/fluid ") == 4 and out.count("right kidney/cyst ") == 4 and out.count("macro ") == 4
    record = json.loads((tmp_path / "eval.json").read_text())
    study = record["subsets"][STUDY_KEY]["labels"]
    for name in ("liver/fluid", "liver/cyst", "right kidney/cyst", "macro"):
        assert {"auc", "balanced_accuracy", "f1", "positives", "threshold"} <= set(study[name])
    # The same numbers from the user-facing detect path, volume files in, one study at a time.
    detector = Detector.load(trained)
    studies = read_medmom(data, "test")
    y = np.array([[s.labels[pair] for pair in LABELS] for s in studies])
    p = np.array([[detector.detect({q: read_volume(f, modality="MR", sequence=q) for q, f in s.volumes.items()})
                   .probability(*pair) for pair in LABELS] for s in studies])
    assert [study[n]["positives"] for n in ("liver/fluid", "liver/cyst", "right kidney/cyst")] == y.sum(0).tolist()
    for c, name in enumerate(("liver/fluid", "liver/cyst", "right kidney/cyst")):
        pairs = y[:, c].sum() * (1 - y[:, c]).sum()
        assert study[name]["auc"] == pytest.approx(roc_auc(y[:, c], p[:, c]), abs=1.01 / pairs)  # one tie at most
    # (How well a tiny model learns in seconds swings with the seed at this size; test_medmap checks learning.)


def test_training_labels_follow_the_model_order_not_the_column_order(data):
    from med3dvlm.data.phantoms import make_mr_study
    from med3dvlm.detection import detector_preprocess
    from med3dvlm.data.medmom_samples import medmom_samples

    studies = read_medmom(data, "train")[:4]
    order = LABELS[::-1]
    samples = medmom_samples(studies, order, detector_preprocess((8, 16, 16)), sequences=("T2",))
    for study, sample in zip(studies, samples):
        truth = make_mr_study(int(study.study_id[2:]), SEQUENCES, shape=(64, 64, 16), n_findings=4).truth
        assert sample.labels.tolist() == [float(pair in truth.pairs) for pair in order]
        assert list(sample.pixels) == ["T2"] and sample.pixels["T2"].shape == (1, 8, 16, 16)
    with pytest.raises(Exception, match="no label column"):
        medmom_samples(studies, (("spleen", "cyst"),), detector_preprocess((8, 16, 16)))


def test_resume_continues_each_stage_rather_than_restarting(data, tmp_path):
    out = tmp_path / "medmap"
    run = ["train", "medmap", "--data", str(data), "--out", str(out), *TINY, *COMMON]
    assert main([*run, "pretrain.epochs=1", "finetune.epochs=1"]) == 0
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_bytes()
    pre_weights = (out / "pretrain" / "checkpoint-last" / "model.safetensors").read_bytes()
    first_losses = json.loads((out / "validation.json").read_text())["steps"]
    assert first_losses == {"pretrain": 4, "finetune": 4} and log_steps(out / "finetune") == [1, 2, 3, 4]

    # More fine-tuning epochs: pre-training is only reloaded, fine-tuning goes on from step 4.
    assert main([*run, "pretrain.epochs=1", "finetune.epochs=2", "resume=true"]) == 0
    assert log_steps(out / "pretrain") == [1, 2, 3, 4]
    assert (out / "pretrain" / "checkpoint-last" / "model.safetensors").read_bytes() == pre_weights
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    assert log_steps(out / "finetune") == list(range(1, 9))
    state = torch.load(out / "finetune" / "checkpoint-last" / "training_state.pt", weights_only=True)
    assert state["step"] == 8 and len(state["losses"]) == 8

    # More pre-training: it continues, and the older fine-tuning no longer fits, so it starts afresh.
    assert main([*run, "pretrain.epochs=2", "finetune.epochs=1", "resume=true"]) == 0
    assert log_steps(out / "pretrain") == list(range(1, 9))
    assert log_steps(out / "finetune") == [1, 2, 3, 4]


def test_two_torchrun_processes_train_one_detector(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "med3dvlm.cli", "train", "medmap", "--data", str(data), "--out", str(out), *TINY, *COMMON,
           "pretrain.epochs=1", "finetune.epochs=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MedMAP detector written to") == 1  # rank 0 alone reports
    assert log_steps(out / "finetune") == [1, 2]  # 32 studies over 2 ranks, 8 per rank and step
    for stage in ("pretrain", "finetune"):
        assert (out / stage / "checkpoint-last" / "rng_state_rank1.pt").is_file()
    assert set(Detector.load(out).thresholds) == {STUDY_KEY, *SEQUENCES}
