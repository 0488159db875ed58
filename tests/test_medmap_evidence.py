"""MedMAP with finding evidence: a segmenter over a study's sequences joins the detector's logits.

Packing a study's slots into sequence channels, crops that show subsets of a study, the segmenter
fixed while the head fine-tunes, the demo build at a tiny size, and its saved model reloading."""

import json

import numpy as np
import pytest
import torch

from med3dvlm.data.lesions import PAIRS
from med3dvlm.data.phantoms import make_mr_study
from med3dvlm.detection import Detector
from med3dvlm.errors import ModelError
from med3dvlm.models.findings import STEM_STRIDE, FindingSegmenter, pair_probabilities
from med3dvlm.models.medmap import MedMAPConfig, MedMAPModel
from med3dvlm.tokenizer import train_tokenizer
from med3dvlm.train.config import TrainConfig
from med3dvlm.train.lesion_crops import LesionCrops
from med3dvlm.train.medmap import (build_model, calibrate, finetune, phantom_samples, segmenter_examples,
                                   train_evidence, train_medmap_demo)

from test_medmap import INPUT, SEQUENCES, SHAPE, tiny_config

LABELS = (("liver", "fluid"), ("liver", "cyst"), ("right kidney", "cyst"))


@pytest.fixture(scope="module")
def samples():
    return phantom_samples(range(600, 612), LABELS, INPUT, SEQUENCES, shape=SHAPE, findings=(4,))


def test_config_keeps_the_released_layout_and_rejects_pairs_the_segmenter_lacks():
    plain = MedMAPModel(tiny_config(LABELS))
    assert not any(k.startswith("evidence") for k in plain.state_dict())
    with pytest.raises(ModelError, match="finding evidence knows only"):
        tiny_config((("liver", "cyst"), ("brain", "mass")), evidence=True)


def test_evidence_is_each_labels_largest_pair_probability_over_the_studys_sequences():
    torch.manual_seed(0)
    model = MedMAPModel(tiny_config(LABELS, evidence=True)).eval()
    model.set_prompts(torch.zeros(len(LABELS), 4, dtype=torch.long), torch.ones(len(LABELS), 4, dtype=torch.long))
    images = torch.rand(2, 3, 1, *INPUT)
    ids = torch.tensor([[2, 0, 1], [1, 0, 0]])   # slots in any order; the second study holds T2 alone
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with torch.no_grad():
        evidence = model.finding_evidence(images, ids, mask)
        # what the segmenter sees: channels in the model's sequence order, absent ones marked
        channels = torch.stack([images[0, [1, 2, 0], 0], torch.zeros(3, *INPUT)])
        channels[1, 1] = images[1, 0, 0]
        present = torch.tensor([[True, True, True], [False, True, False]])
        pairs = pair_probabilities(model.evidence(channels, present=present))
        expected = pairs[:, [PAIRS.index(label) for label in LABELS]].amax((2, 3, 4))
        torch.testing.assert_close(evidence, expected)
        # the logits are the head's plus the calibrated evidence
        tokens, _ = model.encode_study(images, ids, mask)
        logits = model(images, ids, mask)["logits"]
        torch.testing.assert_close(logits, model.detect_logits(tokens) + model.calibrated(evidence))
        # another segmenter, other logits: the evidence is not ignored
        model.evidence.load_state_dict(FindingSegmenter(sequences=3).state_dict())
        assert not torch.allclose(model(images, ids, mask)["logits"], logits)


def test_a_full_grid_segmenter_has_its_targets_and_crops_on_the_full_grid():
    full = phantom_samples([600], LABELS, INPUT, SEQUENCES, shape=SHAPE, findings=(4,), stride=(1, 1, 1))
    example = segmenter_examples(full, SEQUENCES)[0]
    assert example["kinds"].shape == example["organs"].shape == INPUT
    assert (example["kinds"] > 0).any()
    model = MedMAPModel(tiny_config(LABELS, evidence=True, evidence_stride=(1, 1, 1))).eval()
    with torch.no_grad():
        assert model.evidence(example["pixels"][None].float()).shape[2:] == INPUT
    crop = LesionCrops([example], seed=1, crop=(8, 16, 16))[0]
    assert crop["pixels"].shape[1:] == crop["kinds"].shape == crop["organs"].shape == (8, 16, 16)


def test_a_config_saved_before_the_stride_existed_loads_the_half_grid_segmenter():
    saved = tiny_config(LABELS, evidence=True).to_dict()
    del saved["evidence_stride"]
    model = MedMAPModel(MedMAPConfig.from_dict(saved))
    assert model.evidence.stride == STEM_STRIDE == (1, 2, 2)
    assert model.evidence(torch.rand(1, 3, *INPUT)).shape[2:] == (16, 16, 16)
    # a saved stride comes back as JSON does: a list
    assert MedMAPConfig.from_dict({**saved, "evidence_stride": [1, 1, 1]}).evidence_stride == (1, 1, 1)


def test_study_crops_show_every_sequence_half_of_the_time(samples):
    crops = LesionCrops(segmenter_examples(samples, SEQUENCES), seed=3)
    shown = torch.stack([crops[i]["present"] for i in range(200)])
    assert shown.shape == (200, 3) and bool(shown.any(1).all())
    assert 0.45 < float(shown.all(1).float().mean()) < 0.75   # 1/2 whole, plus subsets that hit all three
    assert crops[5]["pixels"].shape == (3, 16, 32, 32)


def test_segmenter_stays_fixed_while_head_and_calibration_fine_tune(samples, tmp_path):
    torch.manual_seed(0)
    tokenizer = train_tokenizer([s.report for s in samples] + tiny_config(LABELS).prompts, vocab_size=300)
    model = build_model(tiny_config(LABELS, evidence=True), tokenizer)
    run = TrainConfig(output_dir=str(tmp_path / "seg"), batch_size=4, lr=3e-3, schedule="constant",
                      grad_clip=None, progress=False)
    curve = train_evidence(model, samples, samples[:4], run, rounds=1, steps_per_round=3, log=lambda *_: None)
    assert [row["steps"] for row in curve] == [3]
    segmenter = {k: v.clone() for k, v in model.evidence.state_dict().items()}
    calibrate(model, samples, steps=20)
    scale = model.evidence_scale.detach().clone()
    assert not torch.equal(scale, torch.ones_like(scale))
    finetune(model, samples, TrainConfig(output_dir=str(tmp_path / "ft"), epochs=1, batch_size=4, progress=False))
    for name, tensor in model.evidence.state_dict().items():   # BatchNorm statistics included
        assert torch.equal(tensor, segmenter[name]), name
    assert not torch.equal(model.evidence_scale, scale)


def test_demo_build_at_a_tiny_size_saves_a_detector_that_reloads(tmp_path):
    out = tmp_path / "demo"
    metrics = train_medmap_demo(out, n_train=6, n_val=4, n_test=4, input_size=INPUT, phantom_shape=SHAPE,
                                pretrain_epochs=1, finetune_epochs=1, batch_size=3, work=tmp_path / "work",
                                segmenter={"rounds": 1, "steps_per_round": 2, "batch_size": 2, "decay_steps": 2},
                                workers=1, progress=False)
    # the constant-rate round, then the decayed copy the detector takes
    assert [(row["steps"], row.get("decay_from")) for row in metrics["segmenter_curve"]] == [(2, None), (4, 2)]
    assert json.loads((out / "metrics.json").read_text())["finetuned"]["study"]["per_label_auc"].keys() == \
        {f"{o}/{k}" for o, k in PAIRS}
    detector = Detector.load(out)
    assert detector.model.config.evidence and len(detector.labels) == len(PAIRS)
    study = make_mr_study(31, shape=SHAPE).volumes
    result = detector.detect(study)
    assert len(result.scores) == len(PAIRS) and all(0 <= s.probability <= 1 for s in result.scores)
    again = Detector.load(out).detect(study)
    assert [(s.label, s.probability) for s in again.scores] == [(s.label, s.probability) for s in result.scores]
    # a single sequence is a study too
    alone = detector.detect({"T2": study["T2"]})
    assert alone.sequences == ("T2",) and len(alone.scores) == len(PAIRS)
    assert np.isfinite([s.probability for s in alone.scores]).all()
