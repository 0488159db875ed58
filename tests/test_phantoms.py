"""Synthetic phantoms, their reports and questions: determinism, anatomy, contrasts, text."""

import re
import time

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from med3dvlm.data import (ABNORMALITIES, ALLOWED, LABELS, LOCATIONS, ORGANS, Finding,
                           GroundTruth, closed_questions, make_ct_phantom, make_mr_study,
                           mentioned_findings, open_questions, write_report)
from med3dvlm.data.lesions import FLUID_LOCATION, PAIRS, SIZE_MM
from med3dvlm.data.reports import READING_ORDER

SMALL = (80, 80, 28)
LABEL_OF = {name: value for value, name in LABELS.items()}


@pytest.fixture(scope="module")
def timed_ct_phantoms():
    """Full-size phantoms with two findings each (covering every kind), and seconds per phantom."""
    start = time.perf_counter()
    phantoms = [make_ct_phantom(seed, n_findings=2) for seed in range(10)]
    return phantoms, (time.perf_counter() - start) / len(phantoms)


@pytest.fixture(scope="module")
def ct_phantoms(timed_ct_phantoms):
    return timed_ct_phantoms[0]


@pytest.fixture(scope="module")
def mr_studies():
    return [make_mr_study(seed, n_findings=2) for seed in range(6)]


def centroid_ras(truth, affine, label):
    ijk = np.argwhere(truth.label_map == label)
    return (affine[:3, :3] @ ijk.mean(axis=0)) + affine[:3, 3]


def test_same_seed_same_phantom_and_different_seed_differs():
    a, b = make_ct_phantom(3, shape=SMALL), make_ct_phantom(3, shape=SMALL)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.volume.affine, b.volume.affine)
    assert a.truth.findings == b.truth.findings
    c = make_ct_phantom(4, shape=SMALL)
    assert not np.array_equal(a.volume.array, c.volume.array)


def test_ct_and_mr_of_one_seed_share_anatomy_and_truth():
    ct = make_ct_phantom(5, shape=SMALL)
    mr = make_mr_study(5, ("T2", "ADC"), shape=SMALL)
    assert mr.truth.findings == ct.truth.findings
    assert np.array_equal(mr.truth.label_map, ct.truth.label_map)
    assert mr.truth.sequences == ("T2", "ADC")
    for seq, vol in mr.volumes.items():
        assert (vol.modality, vol.sequence) == ("MR", seq)
        assert np.array_equal(vol.affine, ct.volume.affine) and vol.shape == ct.volume.shape


def test_geometry_spacing_and_orientation(ct_phantoms):
    layouts = set()
    for p in ct_phantoms:
        vol = p.volume
        assert vol.shape == (160, 160, 48) and vol.array.dtype == np.int16
        sx, sy, sz = vol.spacing
        assert 2.0 < sx < 2.4 and sx == pytest.approx(sy) and 5.0 < sz < 7.0
        codes = "".join(aff2axcodes(vol.affine))
        assert codes == vol.metadata["orientation"]
        layouts.add(codes)
        assert p.truth.label_map.shape == vol.shape == p.truth.finding_map.shape
    assert len(layouts) >= 2            # readers and preprocessing must handle several layouts


def test_organs_are_on_anatomically_correct_sides(ct_phantoms):
    # RAS: +x is the patient's RIGHT, +y anterior, +z superior (nibabel / NIfTI convention).
    for p in ct_phantoms:
        c = {name: centroid_ras(p.truth, p.volume.affine, LABEL_OF[name]) for name in ORGANS}
        assert c["liver"][0] > c["spleen"][0]              # liver on the right, spleen on the left
        assert c["right kidney"][0] > c["left kidney"][0]
        assert c["right lung"][0] > c["left lung"][0]
        assert min(c["left lung"][2], c["right lung"][2]) > max(c["left kidney"][2],
                                                                 c["right kidney"][2])
        assert c["spleen"][1] < c["liver"][1]              # spleen posterior to the liver
        for name in ORGANS:
            assert (p.truth.label_map == LABEL_OF[name]).sum() > 500, name


def test_truth_is_consistent_with_the_maps(ct_phantoms):
    kinds = set()
    for p in ct_phantoms:
        t = p.truth
        assert set(t.organ_labels) == set(ORGANS)
        assert set(np.unique(t.finding_map)) == set(range(len(t.findings) + 1))
        assert len(t.pairs) == len(t.findings) == 2
        inverse = np.linalg.inv(p.volume.affine)
        for i, f in enumerate(t.findings):
            kinds.add(f.kind)
            assert f.kind in ALLOWED[f.organ] and f.kind in t.organ_labels[f.organ]
            assert 6 <= f.size_mm <= SIZE_MM[f.kind][1] + 1
            if f.kind == "fluid":
                assert f.location == FLUID_LOCATION[f.organ]
                continue
            assert f.location in LOCATIONS[f.organ]
            ijk = np.rint(inverse[:3, :3] @ f.center_mm + inverse[:3, 3]).astype(int)
            assert t.finding_map[tuple(ijk)] == i + 1          # the centre is in the lesion
            assert t.label_map[tuple(ijk)] == LABEL_OF[f.organ]
    assert kinds == set(ABNORMALITIES)


def _core(mask):
    """The mask without its in-plane border (partial-volume voxels), unless that is empty."""
    core = mask.copy()
    for axis in (0, 1):
        core &= np.roll(mask, 1, axis) & np.roll(mask, -1, axis)
    return core if core.any() else mask


def _lesion_and_organ(truth, array, index):
    """Median of the lesion core, median of the rest of its organ, peak of the lesion."""
    f = truth.findings[index]
    lesion = truth.finding_map == index + 1
    organ = (truth.label_map == LABEL_OF[f.organ]) & (truth.finding_map == 0)
    return np.median(array[_core(lesion)]), np.median(array[organ]), array[lesion].max()


def test_ct_intensities_follow_the_specification(ct_phantoms):
    for p in ct_phantoms:
        t, hu = p.truth, p.volume.array.astype(np.float32)
        liver = np.median(hu[t.label_map == LABEL_OF["liver"]])
        assert (45 < liver < 75) if t.phase == "non-contrast" else (95 < liver < 125)
        assert np.median(hu[t.label_map == LABEL_OF["right lung"]]) < -700
        assert np.median(hu[t.label_map == LABEL_OF["bone"]]) > 250
        for i, f in enumerate(t.findings):
            lesion, organ, peak = _lesion_and_organ(t, hu, i)
            if f.kind == "cyst":
                assert lesion < 20 and lesion < organ - 15
            elif f.kind == "calcification":
                assert peak >= 300
            elif f.kind == "haemorrhage":   # dense clot; darker than enhancing parenchyma
                assert (80 < lesion < 120 and lesion > organ + 25) if t.phase == "non-contrast" else \
                    (35 < lesion < 75 and lesion < organ - 25)
            elif f.kind == "fluid":
                assert -15 < lesion < 35
            elif f.kind == "mass" and f.organ.endswith("lung"):
                assert lesion > organ + 500
            elif f.kind == "mass" and t.phase == "portal venous":
                assert lesion < organ - 15 and peak > lesion + 40      # enhancing rim
            else:
                assert lesion < organ - 15 and -15 < lesion < 35


def test_mr_sequences_have_typical_contrasts(mr_studies):
    for study in mr_studies:
        t = study.truth
        img = {s: v.array.astype(np.float32) for s, v in study.volumes.items()}
        fat_like = np.median(img["T1"][t.label_map == 0])
        assert fat_like >= 0
        for i, f in enumerate(t.findings):
            le = {s: _lesion_and_organ(t, a, i)[:2] for s, a in img.items()}
            if f.kind == "cyst":
                assert le["T1"][0] < le["T1"][1] and le["T2"][0] > le["T2"][1]
                assert le["ADC"][0] > le["ADC"][1] and le["FLAIR"][0] < le["T2"][0] / 3
            elif f.kind == "mass":
                assert le["DWI"][0] > le["DWI"][1] and le["T1C"][0] > le["T1C"][1]
                if not f.organ.endswith("lung"):               # aerated lung has no ADC
                    assert le["ADC"][0] < le["ADC"][1]
            elif f.kind == "haemorrhage":
                assert le["T1"][0] > le["T1"][1]
            elif f.kind == "fluid":
                assert le["T2"][0] > le["T2"][1] and le["FLAIR"][0] < le["T2"][0] / 3
            else:
                assert le["T2"][0] < le["T2"][1]                # calcification: signal void


def test_arguments_are_checked():
    assert make_ct_phantom(1, shape=SMALL, n_findings=0).truth.findings == []
    with pytest.raises(ValueError, match="shape"):
        make_ct_phantom(1, shape=(8, 8))
    with pytest.raises(ValueError, match="sequences"):
        make_mr_study(1, ("T3",), shape=SMALL)


def test_speed_of_full_size_ct_phantoms(timed_ct_phantoms):
    per_phantom = timed_ct_phantoms[1]
    assert per_phantom < 1.0, f"{per_phantom:.2f} s per phantom"   # about 0.1 s on one core


# ---- text ----------------------------------------------------------------------------------

def random_truth(rng, modality):
    """Text-only ground truth with random findings (no volume needed)."""
    findings = []
    for _ in range(int(rng.integers(0, 4))):
        kind = str(rng.choice(ABNORMALITIES))
        organ = str(rng.choice([o for o in ORGANS if kind in ALLOWED[o]]))
        if any((f.organ, f.kind) == (organ, kind) for f in findings):
            continue
        where = FLUID_LOCATION[organ] if kind == "fluid" else str(rng.choice(LOCATIONS[organ]))
        findings.append(Finding(organ, kind, int(rng.integers(6, 56)), where, (0.0, 0.0, 0.0)))
    phase = str(rng.choice(["non-contrast", "portal venous"])) if modality == "CT" else None
    empty = np.zeros((1, 1, 1), np.uint8)
    return GroundTruth(0, modality, findings, empty, empty, phase=phase)


def test_report_states_exactly_the_truth(ct_phantoms):
    rng = np.random.default_rng(0)
    truths = [p.truth for p in ct_phantoms] + [random_truth(rng, m) for m in ["CT", "MR"] * 250]
    for truth in truths:
        for _ in range(3):                                      # wording varies, content not
            report = write_report(truth, rng)
            assert report.startswith("Findings:") and " Impression: " in report
            assert mentioned_findings(report) == truth.pairs, report
            for f in truth.findings:
                assert f"{f.size_mm} mm" in report


def test_reports_and_lists_state_findings_in_reading_order():
    # drawn right kidney first; read lungs first: every impression and list says the lung first
    findings = [Finding("right kidney", "cyst", 30, "upper pole", (0.0, 0.0, 0.0)),
                Finding("left lung", "mass", 40, "lower lobe", (0.0, 0.0, 0.0))]
    empty = np.zeros((1, 1, 1), np.uint8)
    truth = GroundTruth(0, "CT", findings, empty, empty, phase="non-contrast")
    lung, kidney = re.compile(r"lung|lobe|lingula"), re.compile(r"kidney|renal")
    for seed in range(20):
        rng = np.random.default_rng(seed)
        impression = write_report(truth, rng).split("Impression:")[1]
        listing = next(q["answer"] for q in open_questions(truth, rng) 
                       if q["question"] in ("What abnormalities are present?", "Summarize the abnormal findings."))
        for text in (impression, listing):
            assert lung.search(text).start() < kidney.search(text).start(), text
    assert READING_ORDER[0][0].endswith("lung") and set(READING_ORDER) == set(PAIRS)


def test_reports_vary_in_wording():
    truth = random_truth(np.random.default_rng(3), "CT")
    reports = {write_report(truth, np.random.default_rng(s)) for s in range(20)}
    assert len(reports) > 10


def test_parser_handles_negation_and_spelling_variants():
    assert mentioned_findings("No pleural effusion or ascites. No cyst in the liver.") == set()
    assert mentioned_findings("A 20 mm cyst in the liver; no ascites.") == {("liver", "cyst")}
    assert mentioned_findings("Hemorrhage in the spleen. A left renal mass is not seen.") == {
        ("spleen", "haemorrhage")}
    assert mentioned_findings("Calcified nodule in the right lower lobe.") == {
        ("right lung", "calcification")}
    assert mentioned_findings("Small left pleural effusion, no right pleural effusion.") == {
        ("left lung", "fluid")}


def _check_closed(q, truth):
    assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
    assert q["choices"]["ABCD".index(q["answer_choice"])] == q["answer"]
    text = q["question"]
    if text.startswith("Which organ contains the "):
        kind = text.removeprefix("Which organ contains the ").rstrip("?")
        correct = [c for c in q["choices"] if (c.lower(), kind) in truth.pairs]
        assert correct == [q["answer"]]
    if text.startswith("What abnormality is seen in the "):
        organ = text.removeprefix("What abnormality is seen in the ").rstrip("?")
        assert truth.organ_labels[organ] and len(truth.organ_labels[organ]) == 1
    if text.startswith("How many"):
        assert q["answer"] == ("None", "One", "Two", "Three", "Four")[len(truth.findings)]


def test_closed_questions_have_one_correct_of_four_distinct_choices(ct_phantoms):
    rng = np.random.default_rng(1)
    truths = [p.truth for p in ct_phantoms] + [random_truth(rng, m) for m in ["CT", "MR"] * 100]
    letters, types = [], set()
    for truth in truths:
        seq = "T2" if truth.modality == "MR" else None
        for q in closed_questions(truth, rng, sequence=seq):
            _check_closed(q, truth)
            letters.append(q["answer_choice"])
            types.add(q["type"])
        for q in open_questions(truth, rng, sequence=seq):
            assert q["answer"] and q["question"].endswith(("?", "."))
            if q["question"] == "How many abnormalities are there?":
                assert q["answer"] == str(len(truth.findings))
    assert types == {2, 3, 4, 5}
    counts = np.bincount(["ABCD".index(x) for x in letters], minlength=4)
    assert counts.min() > 0.15 * len(letters)              # answers spread over the letters
