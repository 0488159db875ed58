"""Phantom findings a reader could read, and masks that stay on the pixels through preprocessing."""

import numpy as np
import pytest
import torch

from med3dvlm.data import conspicuity
from med3dvlm.data.anatomy import LABEL_OF
from med3dvlm.data.phantoms import ORIENTATIONS, make_ct_phantom, make_mr_study
from med3dvlm.preprocess import DEMO, carry, preprocess
from med3dvlm.train.dense import N_ORGAN_CLASSES, PAIRS, phantom_targets

# Seeds whose stored layouts cover all four orientations (checked below).
SEEDS = range(31_000, 31_008)


@pytest.fixture(scope="module")
def phantoms():
    out = [make_ct_phantom(seed, n_findings=2) for seed in SEEDS]
    assert {p.volume.metadata["orientation"] for p in out} == set(ORIENTATIONS)
    return out


def _inside(volume, truth, organ: str, flip: bool = False) -> torch.Tensor:
    mask = (truth.label_map == LABEL_OF[organ]).astype(np.float32)
    if flip:  # the same mask mirrored left-right in the stored array: what a wrong axis would do
        mask = mask[::-1].copy()
    return carry(volume, mask[None], DEMO)[0] >= 0.95


def test_organ_masks_sit_on_their_organs_after_preprocessing(phantoms):
    for p in phantoms:
        image = preprocess(p.volume, DEMO)[0]
        assert image.shape == DEMO.shape
        lung = image[_inside(p.volume, p.truth, "right lung")]
        bone = image[_inside(p.volume, p.truth, "bone")]
        liver = image[_inside(p.volume, p.truth, "liver")]
        assert lung.numel() > 100 and lung.mean() < 0.02          # -850 HU: black in the window
        assert bone.numel() > 50 and bone.mean() > 0.75           # cortical bone and marrow: bright
        assert 0.45 < liver.median() < 0.75                       # 60-110 HU parenchyma
        mirrored = image[_inside(p.volume, p.truth, "right lung", flip=True)]
        assert mirrored.numel() == 0 or mirrored.mean() > 0.05    # the check can fail


def test_finding_maps_land_on_the_finding(phantoms):
    for p in phantoms:
        image = preprocess(p.volume, DEMO)[0]
        for i, finding in enumerate(p.truth.findings):
            occupancy = carry(p.volume, (p.truth.finding_map == i + 1).astype(np.float32)[None], DEMO)[0]
            assert occupancy.sum() >= conspicuity.MIN_VOXELS
            if finding.kind == "calcification":   # 750 HU: saturated, wherever it sits
                assert image[occupancy >= 0.5].max() > 0.95, finding


def test_every_ct_finding_is_conspicuous_at_the_demo_input():
    rows = conspicuity.measure(range(32_000, 32_012), "CT")
    assert len(rows) == 48
    summary = conspicuity.table(rows)
    assert not conspicuity.failing(summary), conspicuity.failing(summary)
    assert {"non-contrast", "portal venous"} == {r["group"] for r in summary}


def test_mr_conspicuity_is_measured_per_sequence_and_per_study():
    rows = conspicuity.measure([33_000], "MR")
    assert {r["group"] for r in rows} == {"T1", "T2", "FLAIR", "DWI", "ADC", "T1C"}
    assert all(r["voxels"] > 0 for r in rows)
    best = conspicuity.best_of_study(rows)
    assert len(best) == 4 and all(abs(b["cnr"]) >= max(abs(r["cnr"]) for r in rows if r["finding"] == b["finding"])
                                  for b in best)


def test_dense_targets_are_the_phantoms_organs_and_findings():
    p = make_ct_phantom(34_000, n_findings=2)
    t = phantom_targets(p, DEMO)
    grid = tuple(n // 8 for n in DEMO.shape)
    assert t["organs"].shape == (N_ORGAN_CLASSES, *grid) and t["findings"].shape == (len(PAIRS), *grid)
    assert torch.allclose(t["organs"].float().sum(0), torch.ones(grid), atol=1e-2)
    truth_pairs = {(f.organ, f.kind) for f in p.truth.findings}
    assert {PAIRS[i] for i in torch.nonzero(t["present"]).flatten().tolist()} == truth_pairs
    assert {PAIRS[i] for i in range(len(PAIRS)) if t["findings"][i].any()} == truth_pairs


def test_mr_masks_follow_percentile_preprocessing():
    study = make_mr_study(35_000, ("T2",), n_findings=1)
    volume = study.volumes["T2"]
    image = preprocess(volume, DEMO)[0]
    lung = image[_inside(volume, study.truth, "left lung")]
    spleen = image[_inside(volume, study.truth, "spleen")]
    assert lung.mean() < 0.1 < spleen.mean()   # air-filled lung is dark on T2, spleen is not
