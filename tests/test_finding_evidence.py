"""The demo tower's finding evidence: segmenter targets from the phantoms' masks, lesion-centred
crops, the evidence channels on the image tokens, and a segmenter run that resumes."""

import json

import numpy as np
import pytest
import torch

from med3dvlm.data.lesions import ABNORMALITIES, PAIRS
from med3dvlm.data.phantoms import make_ct_phantom
from med3dvlm.models.dcformer import DCFormer, DCFormerConfig, stage_tokens
from med3dvlm.models.findings import (N_EVIDENCE, N_KINDS, N_ORGANS, FindingSegmenter, pair_places,
                                     pair_probabilities)
from med3dvlm.preprocess import DEMO
from med3dvlm.train.config import TrainConfig
from med3dvlm.train.lesion_crops import (CROP, LesionCrops, _segmenter_example, segmenter_targets, strict_recall,
                                        train_segmenter)

ORGAN_CHANNEL = {"liver": 1, "spleen": 2, "left kidney": 3, "right kidney": 4, "left lung": 5, "right lung": 6}


@pytest.fixture(scope="module")
def examples():
    return [_segmenter_example((seed, 3, DEMO)) for seed in (11, 12, 13)]


def test_targets_put_every_finding_on_its_organ():
    phantom = make_ct_phantom(21, n_findings=4)
    targets = segmenter_targets(phantom, DEMO)
    assert targets["kinds"].shape == targets["organs"].shape == (32, 64, 64)
    kinds_seen = set(torch.unique(targets["kinds"]).tolist()) - {0}
    assert kinds_seen == {1 + ABNORMALITIES.index(f.kind) for f in phantom.truth.findings}
    for finding in phantom.truth.findings:
        cells = targets["kinds"] == 1 + ABNORMALITIES.index(finding.kind)
        # a finding's cells carry its organ, also where it lies outside the organ (ascites, effusion)
        assert ((targets["organs"] == ORGAN_CHANNEL[finding.organ]) & cells).sum() > 0.4 * cells.sum() / len(
            [f for f in phantom.truth.findings if f.kind == finding.kind])
    centres = targets["centres"].long()
    assert len(centres) > 0
    assert (targets["kinds"][centres[:, 0], centres[:, 1] // 2, centres[:, 2] // 2] > 0).float().mean() > 0.9
    assert targets["present"].sum() == len({(f.organ, f.kind) for f in phantom.truth.findings})


def test_crops_are_lesion_centred_two_times_in_three_and_repeatable(examples):
    crops = LesionCrops(examples, seed=5)
    with_lesion = np.mean([bool((crops[i]["kinds"] > 0).any()) for i in range(60)])
    assert 0.5 < with_lesion < 0.95
    item = crops[7]
    assert item["pixels"].shape == (1, *CROP) and item["coords"].shape == (3, *CROP)
    assert item["kinds"].shape == (16, 16, 16)
    assert torch.equal(crops[7]["pixels"], item["pixels"])      # drawn from (seed, index) alone
    assert not torch.equal(LesionCrops(examples, seed=6)[7]["pixels"], item["pixels"])


def test_evidence_channels_are_the_largest_pair_probability_in_each_token_cell_and_the_pair_places():
    config = DCFormerConfig.preset("nano", input_size=(32, 128, 128))
    assert not any(k.startswith("evidence.") for k in DCFormer(config).state_dict())  # released layout kept
    torch.manual_seed(0)
    tower = DCFormer(DCFormerConfig(**{**config.__dict__, "evidence": True})).eval()
    pixels = torch.rand(1, 1, 32, 128, 128)
    with torch.no_grad():
        maps = tower(pixels)
        logits = tower.evidence(pixels)
    pairs, places = pair_probabilities(logits), pair_places(logits)
    (low_n, low_c), (high_n, high_c) = tower.token_shapes()[-2:]
    assert stage_tokens(maps[3]).shape == (1, low_n, low_c) and low_c == 128 + N_EVIDENCE
    assert stage_tokens(maps[4]).shape == (1, high_n, high_c) and high_c == 256 + N_EVIDENCE
    # stage 4 is a 1 x 2 x 2 grid: its first token's cell is the first in-plane quadrant
    first_cell = pairs[0, :, :, :32, :32].amax((1, 2, 3))
    assert torch.allclose(maps[4][0, 256:256 + len(PAIRS), 0, 0, 0], first_cell)
    # then every pair's place in its organ (D, H, W), the same on every token
    for token in [(0, 0, 0), (0, 1, 1)]:
        assert torch.allclose(maps[4][0, 256 + len(PAIRS):, token[0], token[1], token[2]], places[0].flatten())
    assert N_EVIDENCE == 4 * len(PAIRS)


@pytest.mark.parametrize("top", [True, False])
def test_a_pair_place_says_where_in_its_organ_the_finding_lies(top):
    """A kidney filling slices 4-27 and a mass in its top or bottom few slices: the mass's place along
    D is near the organ's end (about +-0.8), and near its middle in-plane; a pole the tokens'
    depth-collapsed cells cannot tell."""
    pair = PAIRS.index(("left kidney", "mass"))
    logits = torch.full((1, N_KINDS + N_ORGANS, 32, 16, 16), -10.0)
    logits[:, 0] = logits[:, N_KINDS] = 10.0                      # background, other tissue
    logits[0, N_KINDS + 3, 4:28, 4:12, 4:12] = 20.0                # the left kidney (organ channel 3)
    mass = (slice(23, 27) if top else slice(5, 9), slice(6, 10), slice(6, 10))
    logits[(0, 1 + ABNORMALITIES.index("mass"), *mass)] = 20.0
    places = pair_places(logits)[0]
    depth, rows, columns = places[pair].tolist()
    assert (depth > 0.6) if top else (depth < -0.6), depth
    assert abs(rows) < 0.2 and abs(columns) < 0.2
    # a pair the segmenter does not see (no spleen here) has no place: it does not tell volumes apart
    assert places[PAIRS.index(("spleen", "mass"))].abs().max() < 1e-3


def test_segmenter_training_records_its_curve_and_resumes(examples, tmp_path):
    torch.manual_seed(0)
    segmenter = FindingSegmenter()
    config = TrainConfig(output_dir=str(tmp_path / "seg"), batch_size=4, lr=3e-3, schedule="constant",
                         progress=False, grad_clip=None)
    curve = train_segmenter(segmenter, examples, examples, config, rounds=2, steps_per_round=3, log=lambda *_: None)
    assert [row["steps"] for row in curve] == [3, 6] and all(0 <= row["macro_auc"] <= 1 for row in curve)
    trained = FindingSegmenter()
    again = train_segmenter(trained, examples, examples, config, rounds=1, steps_per_round=3, log=lambda *_: None)
    assert [row["steps"] for row in again] == [3, 6, 9]
    # zero rounds (`--segmenter-rounds 0`) is the run's trained segmenter, not a fresh one
    kept = FindingSegmenter()
    assert train_segmenter(kept, examples, examples, config, rounds=0, steps_per_round=3, log=lambda *_: None) == again
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), trained.state_dict().values()))
    assert json.loads((tmp_path / "seg" / "curve.json").read_text())[-1]["crops"] == 36
    assert again[-1]["train_seconds"] >= curve[-1]["train_seconds"]


def test_a_decayed_copy_branches_off_and_the_constant_run_goes_on(examples, tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(output_dir=str(tmp_path / "seg"), batch_size=4, lr=3e-3, schedule="constant",
                         progress=False, grad_clip=None)
    quiet = {"log": lambda *_: None}
    constant = FindingSegmenter()
    train_segmenter(constant, examples, examples, config, rounds=1, steps_per_round=3, **quiet)
    decayed = FindingSegmenter()
    curve = train_segmenter(decayed, examples, examples, config, rounds=0, steps_per_round=3, decay_steps=4, **quiet)
    assert [(row["steps"], row.get("decay_from")) for row in curve] == [(3, None), (7, 3)]
    assert not torch.equal(decayed.stem[0].weight, constant.stem[0].weight)
    # a rerun reuses the finished branch; the run's own curve and checkpoint stay the constant run's
    again = FindingSegmenter()
    assert train_segmenter(again, examples, examples, config, rounds=0, steps_per_round=3, decay_steps=4, **quiet) == curve
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), decayed.state_dict().values()))
    assert [row["steps"] for row in json.loads((tmp_path / "seg" / "curve.json").read_text())] == [3]
    resumed = FindingSegmenter()
    assert [row["steps"] for row in train_segmenter(resumed, examples, examples, config, rounds=1, steps_per_round=3,
                                                    **quiet)] == [3, 6]


def test_strict_recall_counts_findings_above_what_one_volume_in_ten_invents():
    present = np.zeros((20, 3), bool)
    present[:10, 0] = True
    scores = np.full((20, 3), 0.1)
    scores[:10, 0] = np.linspace(0.2, 0.9, 10)      # true findings
    scores[18:, 1] = [0.5, 0.95]                    # two volumes of twenty (10 %) invent a pair
    assert strict_recall(present, scores) == 0.6     # above 0.5: the findings scored 0.59 .. 0.9
    assert strict_recall(present, scores, false_share=0.05) == 0.0


def test_segmenter_learns_what_a_cell_holds(examples):
    """Twenty-five steps on one batch of crops: the loss falls well below where it starts."""
    from med3dvlm.train.lesion_crops import segmenter_loss

    torch.manual_seed(0)
    segmenter = FindingSegmenter()
    optimiser = torch.optim.Adam(segmenter.parameters(), 3e-3)
    crops = LesionCrops(examples, seed=1)
    batch = {k: torch.stack([crops[i][k] for i in range(8)]) for k in crops[0]}
    losses = []
    for _ in range(25):
        loss = segmenter_loss(segmenter, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
