"""Evidence maps: where an answer came from, on the volume's own grid, in any orientation and crop.

The models (see box_models.py) can only be moved by the inferior, anterior, right octant of what
they are shown, so that is where the evidence must land on the scan, whatever the preprocessing did
(reorientation, foreground crop, resize, region crop).
"""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from box_models import BODY, body_volume, box_detector, box_pipeline, centres, octant, reoriented
from med3dvlm.attribution import attribute
from med3dvlm.cli import main
from med3dvlm.errors import Med3DVLMError, ModelError
from med3dvlm.region import MARGIN_MM
from med3dvlm.resources import sample_path
from med3dvlm.volume import Volume

CT = str(sample_path("ct_phantom.nii.gz"))
ANSWER = "The liver is enlarged with a hypodense lesion."
REGION = ((-2.0, 18.0, -20.0), (10.0, 30.0, 5.0))  # RAS mm, inside the body of body_volume()


@pytest.fixture(scope="module")
def pipe():
    return box_pipeline()


def body_mask(codes: str) -> np.ndarray:
    """The tissue voxels of body_volume() stored as ``codes``: what the foreground crop keeps."""
    volume = body_volume()
    mask = np.zeros(volume.shape, np.int16)
    mask[BODY] = 1
    return reoriented(Volume(mask, volume.affine), codes).array.astype(bool)


def near_region(volume, region, margin=MARGIN_MM) -> np.ndarray:
    """Voxels whose centres lie in the region or within ``margin`` mm of it."""
    xyz, low, high = centres(volume), np.min(region, axis=0), np.max(region, axis=0)
    return np.all((xyz >= low - margin - 1e-6) & (xyz <= high + margin + 1e-6), axis=-1)


def share_in(evidence: np.ndarray, where: np.ndarray) -> float:
    mass = np.abs(evidence)
    return float(mass[where].sum() / mass.sum())


@pytest.mark.parametrize("codes, method", [("RAS", "smoothgrad"), ("LPS", "smoothgrad"), ("PIR", "integrated")])
def test_report_evidence_lands_where_the_model_reads(pipe, codes, method):
    volume = reoriented(body_volume(), codes)
    evidence = pipe.explain(volume, answer=ANSWER, method=method, samples=4)
    assert evidence.map.shape == volume.shape and evidence.map.array.dtype == np.float32
    np.testing.assert_array_equal(evidence.map.affine, volume.affine)
    seen = body_mask(codes)
    assert not evidence.map.array[~seen].any()  # air was cropped away: the model never saw it
    assert share_in(evidence.map.array, octant(volume, seen)) >= 0.9
    assert evidence.answer == ANSWER and evidence.question is None and evidence.method == method


@pytest.mark.parametrize("codes", ["LPS", "SLA"])
def test_question_evidence_in_a_region_lands_where_the_model_reads(pipe, codes):
    volume = reoriented(body_volume(), codes)
    evidence = pipe.explain(volume, "Is there a cyst?", "No focal lesion.", region=REGION, samples=4)
    seen = body_mask(codes) & near_region(volume, REGION)
    assert not evidence.map.array[~seen].any()
    assert share_in(evidence.map.array, octant(volume, seen)) >= 0.9
    assert evidence.preprocessing["region"]["ras"] == [list(c) for c in REGION]


def test_the_answer_explained_is_the_models_own_unless_given(pipe):
    volume = body_volume()
    question = "Is there a cyst?"
    evidence = pipe.explain(volume, question, samples=1)
    assert evidence.answer == pipe.ask(volume, question, do_sample=False)
    assert evidence.question == question
    choices = ["liver", "spleen", "left kidney"]
    closed = pipe.explain(volume, "Which organ has the lesion?", choices=choices, samples=1)
    assert closed.answer == pipe.ask(volume, "Which organ has the lesion?", choices=choices)
    with pytest.raises(Med3DVLMError, match="question is empty"):
        pipe.explain(volume, "  ", answer="Yes.")


def test_only_the_input_gets_gradients_and_host_memory_mode_agrees(pipe):
    volume = reoriented(body_volume(), "LPS")
    flags = [p.requires_grad for p in pipe.model.parameters()]
    plain = pipe.explain(volume, answer=ANSWER, samples=2)
    offloaded = pipe.explain(volume, answer=ANSWER, samples=2, save_memory=True)
    np.testing.assert_allclose(offloaded.map.array, plain.map.array, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in pipe.model.parameters())
    assert [p.requires_grad for p in pipe.model.parameters()] == flags


def test_integrated_gradients_account_for_the_whole_change():
    weights = torch.linspace(-1, 2, 60).reshape(3, 4, 5)
    score = lambda x: (weights * torch.tanh(2 * x)).sum()  # noqa: E731
    inputs = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(3))
    attribution = attribute(score, inputs, "integrated", samples=64)
    assert float(attribution.sum()) == pytest.approx(float(score(inputs) - score(torch.zeros_like(inputs))), rel=1e-3)
    with pytest.raises(Med3DVLMError, match="Unknown attribution method"):
        attribute(score, inputs, "occlusion")


def test_abnormality_score_evidence_lands_where_the_detector_reads():
    detector = box_detector()
    study = {"T1": body_volume("MR", seed=1), "T2": reoriented(body_volume("MR", seed=2), "PIR")}
    maps = detector.explain(study, "cyst in the liver", samples=4)
    assert list(maps) == ["T1", "T2"]
    probability = detector.detect(study).probability("liver", "cyst")
    for sequence, codes in (("T1", "RAS"), ("T2", "PIR")):
        evidence, volume = maps[sequence], study[sequence]
        assert evidence.map.shape == volume.shape and np.array_equal(evidence.map.affine, volume.affine)
        assert share_in(evidence.map.array, octant(volume, body_mask(codes))) >= 0.9
        assert evidence.question == "cyst in the liver" and float(evidence.answer) == pytest.approx(probability, abs=1e-3)
    with pytest.raises(ModelError, match="no label 'polyp in the colon'"):
        detector.explain(study, "polyp in the colon")


def test_cli_writes_the_report_evidence_on_the_input_grid(tmp_path, capsys):
    out = tmp_path / "map.nii.gz"
    assert main(["explain", CT, "--output", str(out), "--samples", "2", "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    source, written = nib.load(CT), nib.load(out)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    evidence = np.asarray(written.dataobj)
    assert evidence.dtype == np.float32 and np.abs(evidence).sum() > 0
    assert printed["question"] is None and printed["answer"].startswith("Findings")
    assert printed["provenance"]["task"] == "explain" and printed["provenance"]["weights_blake2b"]
    # Nothing outside the box of the scan the model was shown.
    (i0, i1), (j0, j1), (k0, k1) = printed["provenance"]["preprocessing"]["volumes"][0]["crop_box"][::-1]
    (ni, nj, _), inside = evidence.shape, np.zeros(evidence.shape, bool)
    inside[ni - i1:ni - i0, nj - j1:nj - j0, k0:k1] = True  # a RAS file: model axes (D, H, W) = (k, -j, -i)
    assert not evidence[~inside].any()


def test_cli_explains_an_answer_about_a_region(tmp_path, capsys):
    out = tmp_path / "map.nii.gz"
    region = ["-100", "-80", "-250", "50", "60", "-150"]
    assert main(["explain", CT, "What is the contrast phase of this CT scan?", "--answer", "Portal venous",
                 "--region", *region, "--output", str(out), "--samples", "1", "--device", "cpu"]) == 0
    assert "Portal venous" in capsys.readouterr().out
    written = nib.load(out)
    evidence = np.asarray(written.dataobj)
    volume = Volume(evidence, written.affine)
    corners = np.array(region, float).reshape(2, 3)
    assert np.abs(evidence).sum() > 0 and not evidence[~near_region(volume, corners)].any()
