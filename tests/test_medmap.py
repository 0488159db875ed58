"""MedMAP: sequence inference, the model's zero-shot start, training stages, detection, persistence, MedMoM."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3dvlm.data.medmom import PHANTOM_LABELS, read_medmom, write_phantom_medmom
from med3dvlm.data.phantoms import make_mr_study
from med3dvlm.detection import STUDY_KEY, Detector, as_study, detector_preprocess, score_studies
from med3dvlm.detection_result import DetectionResult
from med3dvlm.eval.classification import select_threshold
from med3dvlm.errors import Med3DVLMError, ModelError, VolumeError
from med3dvlm.models.medmap import MedMAPConfig, MedMAPModel
from med3dvlm.models.text import TextConfig
from med3dvlm.tokenizer import train_tokenizer
from med3dvlm.train.medmap import TEXT_PARAMS, build_model, choose_thresholds, finetune, phantom_samples, pretrain
from med3dvlm.train.config import TrainConfig
from med3dvlm.volume import Volume

SEQUENCES = ("T1", "T2", "DWI")
INPUT = (16, 32, 32)
SHAPE = (64, 64, 16)  # phantom grid (same field of view as the full size, coarser voxels)
TINY_TEXT = TextConfig("bert", dict(vocab_size=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=160), "mean")


# The finding a few seconds of training learns reliably: perihepatic fluid is large, and with four
# findings per training study it has plenty of positives. (Focal lesions need minutes; see the demo.)
LIFT_LABELS = (("liver", "fluid"),)
FT_EPOCHS = 20


def tiny_config(labels=PHANTOM_LABELS, **overrides):
    return MedMAPConfig(tuple(labels), sequences=SEQUENCES, input_size=INPUT, stem_channels=4, embed_dim=32,
                        text=TINY_TEXT, **overrides)


def volume(metadata=None, source=None, sequence=None, modality="MR"):
    array = np.random.default_rng(0).random((20, 20, 12)).astype(np.float32) * 100
    return Volume.from_numpy(array, modality=modality, sequence=sequence, metadata=metadata or {}, source=source)


# ---- sequence inference -------------------------------------------------------------------
def test_sequences_come_from_headers_file_names_and_mr_timing():
    study = as_study([volume({"SeriesDescription": "Ax T2 FSE", "Modality": "MR"}),
                      volume(source="/data/case7/axial_flair.nii.gz"),
                      volume({"Modality": "MR", "RepetitionTime": 500, "EchoTime": 12}),
                      volume({"Modality": "MR", "DiffusionBValue": 800}),
                      volume({"SeriesDescription": "T1 post gad", "Modality": "MR"})],
                     ("T1", "T2", "FLAIR", "DWI", "ADC", "T1C"))
    assert list(study) == ["T2", "FLAIR", "T1", "DWI", "T1C"]


def test_user_choice_of_sequence_wins_and_bad_studies_get_clear_errors():
    known = ("T1", "T2", "DWI")
    # The mapping is the user's choice: keys win over the header, case does not matter.
    study = as_study({"t2": volume({"SeriesDescription": "T1 weighted"}), "DWI": volume()}, known)
    assert list(study) == ["T2", "DWI"]
    with pytest.raises(VolumeError, match="unknown"):
        as_study(volume(source="scan.nii.gz"), known)
    with pytest.raises(VolumeError, match="CT"):
        as_study(volume({"Modality": "CT"}, modality="CT"), known)
    with pytest.raises(VolumeError, match="two T2"):
        as_study([volume(sequence="T2"), volume(source="t2_axial.nii")], known)
    with pytest.raises(VolumeError, match="knows only"):
        as_study(volume(sequence="FLAIR"), known)
    with pytest.raises(VolumeError, match="empty"):
        as_study([], known)


# ---- model --------------------------------------------------------------------------------
def test_fusion_weights_padding_and_the_zero_shot_score():
    torch.manual_seed(0)
    model = MedMAPModel(tiny_config()).eval()
    model.set_prompts(torch.randint(0, 1, (len(PHANTOM_LABELS), 5)), torch.ones(len(PHANTOM_LABELS), 5))
    images = torch.rand(2, 3, 1, *INPUT)
    ids = torch.tensor([[0, 1, 2], [1, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with torch.no_grad():
        out = model(images, ids, mask)
        zero = model(images, ids, mask, zero_shot=True)["logits"]
        alone = model(images[1:, :1], ids[1:, :1], mask[1:, :1])
        tokens, _ = model.encode_study(images, ids, mask)
        labels = model.label_embeddings()
    weights = out["weights"]
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert torch.all(weights[1, 1:] == 0)  # empty slots take no weight
    torch.testing.assert_close(out["logits"][1:], alone["logits"])  # padding slots change nothing
    # zero-shot = scaled cosine of the study embedding with each prompt's text embedding, plus bias
    expected = model.t_prime.exp() * F.normalize(model.mm_vision_proj(tokens.mean(1)), dim=-1) @ labels.T + model.bias
    torch.testing.assert_close(zero, expected)
    with pytest.raises(ModelError, match="at least one volume"):
        model(images, ids, torch.zeros(2, 3, dtype=torch.bool))


def test_config_round_trips_and_rejects_bad_values(tmp_path):
    config = tiny_config()
    again = MedMAPConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.prompts[0] == "a cyst in the liver"
    with pytest.raises(ModelError, match="divisible by 32"):
        tiny_config(backbone="swin")
    with pytest.raises(ModelError, match="distinct"):
        tiny_config(labels=[("liver", "cyst"), ("liver", "cyst")])


def test_swin_backbone_is_a_drop_in_alternative():
    pytest.importorskip("monai")
    pytest.importorskip("einops")  # MONAI's SwinViT needs it
    torch.manual_seed(0)
    config = MedMAPConfig((("liver", "cyst"), ("spleen", "mass")), sequences=SEQUENCES, backbone="swin",
                          input_size=(32, 32, 32), swin_feature_size=12, token_stage=3, stem_channels=2,
                          embed_dim=24, text=TINY_TEXT)
    model = MedMAPModel(config).eval()
    model.set_prompts(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with torch.no_grad():
        out = model(torch.rand(1, 2, 1, 32, 32, 32), torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.bool))
        tokens, _ = model.encode_study(torch.rand(1, 2, 1, 32, 32, 32), torch.tensor([[0, 2]]),
                                       torch.ones(1, 2, dtype=torch.bool))
    assert tokens.shape == (1, 8, 24)  # grid 2x2x2 at stage 3 of a 32^3 input
    assert out["logits"].shape == (1, 2) and torch.isfinite(out["logits"]).all()


# ---- training -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Pre-train, snapshot the zero-shot scores, fine-tune: seconds, on fresh small phantoms."""
    torch.manual_seed(0)
    labels = LIFT_LABELS
    train = phantom_samples(range(500, 548), labels, INPUT, SEQUENCES, shape=SHAPE, findings=(4,))
    test = phantom_samples(range(900, 940), labels, INPUT, SEQUENCES, shape=SHAPE, findings=(3, 4))
    tokenizer = train_tokenizer([s.report for s in train] + tiny_config(labels).prompts, vocab_size=400)
    model = build_model(tiny_config(labels), tokenizer)
    runs = tmp_path_factory.mktemp("runs")
    common = dict(batch_size=8, lr=3e-3, progress=False, device="cpu", warmup_steps=2)
    pretrain(model, train, tokenizer, TrainConfig(output_dir=str(runs / "pre"), epochs=2, **common))
    zero_shot = score_studies(model, test, zero_shot=True)
    text_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(TEXT_PARAMS)}
    vision_before = model.backbone.encoder.s1[0].proj.weight.clone()
    finetune(model, train, TrainConfig(output_dir=str(runs / "ft"), epochs=FT_EPOCHS, **common), full_study_p=1.0)
    y_test = torch.stack([s.labels for s in test]).numpy()
    return dict(model=model, tokenizer=tokenizer, train=train, test=test, y_test=y_test, zero_shot=zero_shot,
                finetuned=score_studies(model, test), text_before=text_before, vision_before=vision_before)


def macro_auc_of(y, p):
    from med3dvlm.eval.classification import macro_auc

    return macro_auc(y, p)


def test_fine_tuning_lifts_macro_auc_clearly_above_zero_shot(trained):
    zero = macro_auc_of(trained["y_test"], trained["zero_shot"])
    tuned = macro_auc_of(trained["y_test"], trained["finetuned"])
    assert tuned >= zero + 0.2, (zero, tuned)
    assert tuned >= 0.9, (zero, tuned)


def test_text_encoder_stays_bit_identical_while_vision_learns(trained):
    model = trained["model"]
    after = {k: v for k, v in model.state_dict().items() if k.startswith(TEXT_PARAMS)}
    assert after.keys() == trained["text_before"].keys() and len(after) > 10
    for name, tensor in after.items():
        assert torch.equal(tensor, trained["text_before"][name]), name
    assert not torch.equal(model.backbone.encoder.s1[0].proj.weight, trained["vision_before"])


def make_detector(trained):
    y = torch.stack([s.labels for s in trained["train"]]).numpy()
    model = trained["model"]
    thresholds = {STUDY_KEY: choose_thresholds(y, score_studies(model, trained["train"]))}
    return Detector(model, trained["tokenizer"], thresholds, detector_preprocess(INPUT))


def test_detect_on_a_multi_sequence_study(trained):
    detector = make_detector(trained)
    study = make_mr_study(4321, SEQUENCES, shape=SHAPE)
    for v in study.volumes.values():
        v.sequence = None  # found again from the file names
    result = detector.detect(list(study.volumes.values()))
    assert result.sequences == SEQUENCES and result.modality == "MR"
    probabilities = [s.probability for s in result.scores]
    assert probabilities == sorted(probabilities, reverse=True)
    assert len(result.scores) == len(detector.labels) and all(0 <= p <= 1 for p in probabilities)
    assert sum(result.sequence_weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(result.sources) == set(SEQUENCES)
    assert {(s.organ, s.kind) for s in result.findings} == {(s.organ, s.kind) for s in result.scores if s.positive}
    rows = result.rows()
    assert rows[0]["probability"] == probabilities[0] and "positive" in rows[0]
    single = detector.detect({"T2": study.volumes["T2"]})
    assert single.sequences == ("T2",) and single.sequence_weights == {"T2": pytest.approx(1.0)}
    # The same study through detect and through the training-time path gives the same numbers.
    sample = phantom_samples([4321], detector.labels, INPUT, SEQUENCES, shape=SHAPE)
    expected = score_studies(detector.model, sample)[0]
    got = np.array([result.probability(o, k) for o, k in detector.labels])
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float16 storage of training pixels


def test_thresholds_only_where_validation_scores_separate_the_studies():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.15).astype(int)
    y[:, 2] = 0                                                   # a label no validation study has
    informative = y[:, 0] * 0.5 + rng.random(200) * 0.6           # AUC ~0.9
    noise = rng.random(200) * 0.1                                 # one sequence that shows nothing
    cuts = choose_thresholds(y, np.stack([informative, noise, noise], 1))
    assert 0.3 < cuts[0] < 0.7 and cuts[1] is None and cuts[2] is None
    # What F1 alone does on noise: a low cut that flags over twice the studies holding the label.
    assert (noise >= select_threshold(y[:, 1], noise)).mean() > 2 * y[:, 1].mean()


def test_no_threshold_that_flags_most_studies_without_the_label_or_sits_near_zero():
    """Scores ~0 with or without the label (a segmenter that misses the kind) still rank the studies
    (AUC > 0.8), but F1's cut sits near 0: where it flags most studies without the label, and where
    it calls a finding the detector gives under 1 %, the label is not called."""
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.3).astype(int)
    flags_most = np.where(y[:, 0] == 1, rng.uniform(0.2, 1, 200), rng.uniform(0, 1, 200)) * 1e-3
    near_zero = np.where(y[:, 1] == 1, rng.uniform(0.3, 0.8, 200), rng.uniform(0, 0.4, 200)) * 1e-2
    seen = y[:, 2] * 0.5 + rng.random(200) * 0.6
    for c, scores in enumerate([flags_most, near_zero]):   # what F1 alone would call
        cut = select_threshold(y[:, c], scores)
        assert cut < 0.01 and ((scores[y[:, c] == 0] >= cut).mean() > 0.5) == (c == 0)
    cuts = choose_thresholds(y, np.stack([flags_most, near_zero, seen], 1))
    assert cuts[0] is None and cuts[1] is None and 0.3 < cuts[2] < 0.7


def test_a_label_not_called_is_never_positive_and_survives_save_and_the_wire(trained, tmp_path):
    detector = make_detector(trained)
    uncalled = detector.labels[0]
    detector.thresholds[STUDY_KEY][0] = None
    detector.thresholds["T2"] = [0.0] * len(detector.labels)      # T2 alone: every label called, all positive
    detector.save(tmp_path / "det")
    again = Detector.load(tmp_path / "det")
    study = make_mr_study(77, SEQUENCES, shape=SHAPE).volumes
    result = again.detect(study)
    score = next(s for s in result.scores if (s.organ, s.kind) == uncalled)
    assert score.threshold is None and not score.called and not score.positive
    assert uncalled not in {(s.organ, s.kind) for s in result.findings}
    wire = DetectionResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert wire.scores == result.scores
    assert all(s.positive for s in again.detect({"T2": study["T2"]}).scores)


def test_save_load_round_trip_and_broken_folders(trained, tmp_path):
    detector = make_detector(trained)
    detector.save(tmp_path / "det")
    again = Detector.load(tmp_path / "det")
    study = make_mr_study(77, SEQUENCES, shape=SHAPE).volumes
    a, b = detector.detect(study), again.detect(study)
    assert [(s.organ, s.kind, s.probability, s.threshold) for s in a.scores] == \
        [(s.organ, s.kind, s.probability, s.threshold) for s in b.scores]
    assert again.model.text_frozen and again.model.config == detector.model.config
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    assert config["model_type"] == "medmap-detector"
    with pytest.raises(ModelError, match="does not exist"):
        Detector.load(tmp_path / "missing")
    (tmp_path / "det" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="corrupted"):
        Detector.load(tmp_path / "det")


# ---- MedMoM layout ------------------------------------------------------------------------
def test_medmom_layout_round_trip_and_errors(tmp_path):
    table = write_phantom_medmom(tmp_path / "mm", {"train": [3, 4], "test": [5]}, ("T2", "ADC"), shape=(48, 48, 16))
    studies = read_medmom(tmp_path / "mm")
    assert [s.split for s in studies] == ["train", "train", "test"]
    first = studies[0]
    assert set(first.volumes) == {"T2", "ADC"} and all(p.is_file() for p in first.volumes.values())
    truth = make_mr_study(3, ("T2",), shape=(48, 48, 16)).truth
    assert {pair for pair, flag in first.labels.items() if flag} == truth.pairs
    assert first.report.startswith("Findings:")
    assert [s.study_id for s in read_medmom(table, split="test")] == ["mr000005"]
    # the sequence column may be empty: the file name tells it
    rows = table.read_text().splitlines()
    header = rows[0]
    json_rows = [dict(zip(header.split(","), ["mr1", "train", "", str(first.volumes["T2"]), "ok"] + ["0"] * 23))]
    (tmp_path / "t.json").write_text(json.dumps(json_rows))
    assert list(read_medmom(tmp_path / "t.json")[0].volumes) == ["T2"]
    json_rows[0]["liver/cyst"] = "2"
    (tmp_path / "t.json").write_text(json.dumps(json_rows))
    with pytest.raises(Med3DVLMError, match="0 or 1"):
        read_medmom(tmp_path / "t.json")
    (tmp_path / "bad.csv").write_text("study_id,path\nx,y\n")
    with pytest.raises(Med3DVLMError, match="lacks the column"):
        read_medmom(tmp_path / "bad.csv")
