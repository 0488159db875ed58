"""M3D-layout dataset writer and readers, on our files and on files laid out like the real M3D."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data import (ORGANS, make_ct_phantom, mentioned_findings, read_cap, read_vqa,
                           write_dataset, write_samples)
from med3dvlm.data.m3d import VQA_COLUMNS, case_seed
from med3dvlm.errors import Med3DVLMError

SMALL = (64, 64, 24)
M3D_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B",
               "Choice C", "Choice D", "Answer", "Answer Choice"]


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    manifest = write_dataset(root, 6, seed=11, splits=(4, 1, 1), progress=False, shape=SMALL)
    return root, manifest


def test_layout_and_manifest(ct_root):
    root, manifest = ct_root
    assert manifest["seed"] == 11 and manifest["splits"] == {"train": 4, "validation": 1, "test": 1}
    assert json.loads((root / "manifest.json").read_text())["generator_version"]
    cap = json.loads((root / "M3D_Cap_npy" / "M3D_Cap.json").read_text())
    assert {k: len(v) for k, v in cap.items()} == {"train": 4, "validation": 1, "test": 1}
    entry = cap["train"][0]
    assert entry["image"].startswith("M3D_Cap_npy/ct_case/") and entry["text"].endswith("text.txt")
    for split in ("train", "val", "test"):
        with open(root / "M3D-VQA" / f"M3D_VQA_{split}.csv", newline="") as fh:
            assert next(csv.reader(fh)) == M3D_COLUMNS
    assert list(VQA_COLUMNS) == M3D_COLUMNS


def test_round_trip_of_volumes_reports_and_questions(ct_root):
    root, _ = ct_root
    items = read_cap(root / "M3D_Cap_npy" / "M3D_Cap.json", "train")
    labels = json.loads((root / "labels.json").read_text())
    first = items[0]
    img = nib.load(first.image_path)
    phantom = make_ct_phantom(case_seed(11, 0), shape=SMALL)       # native geometry, not resized
    assert np.array_equal(np.asarray(img.dataobj), phantom.volume.array)
    assert np.allclose(img.affine, phantom.volume.affine)
    case = labels["cases"][0]
    assert case["seed"] == case_seed(11, 0) and set(case["organ_labels"]) == set(ORGANS)
    truth_pairs = {(f["organ"], f["kind"]) for f in case["findings"]}
    assert mentioned_findings(first.text) == truth_pairs
    assert first.text == (first.image_path.parent / "text.txt").read_text()

    closed = read_vqa(root / "M3D-VQA" / "M3D_VQA_train.csv")
    assert closed and all(q.closed and q.image_path.is_file() for q in closed)
    assert all(q.choices["ABCD".index(q.answer_choice)] == q.answer for q in closed)
    assert {q.question_type for q in closed} <= {2, 3, 4, 5}
    assert {q.text for q in closed} == {i.text for i in items}
    opened = read_vqa(root / "M3D-VQA" / "M3D_VQA_open_train.csv")
    assert opened and not any(q.closed for q in opened) and all(q.answer for q in opened)


def test_writer_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, 2, seed=3, progress=False, shape=SMALL)
    for rel in ("M3D-VQA/M3D_VQA_train.csv", "M3D_Cap_npy/M3D_Cap.json", "labels.json"):
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text()


def test_mr_dataset_has_one_file_per_sequence(tmp_path):
    write_dataset(tmp_path, 2, seed=5, modality="MR", splits=(1, 0, 1), progress=False,
                  shape=SMALL, sequences=("T2", "DWI"))
    items = read_cap(tmp_path / "M3D_Cap_npy" / "M3D_Cap.json", "train")
    assert sorted(i.image_path.name for i in items) == ["Axial_DWI.nii.gz", "Axial_T2.nii.gz"]
    labels = json.loads((tmp_path / "labels.json").read_text())
    sequences = {v["sequence"] for c in labels["cases"] for v in c["images"].values()}
    assert sequences == {"T2", "DWI"}
    for q in read_vqa(tmp_path / "M3D-VQA" / "M3D_VQA_train.csv"):
        if q.question_type == 2:                        # the sequence question
            expected = "T2-weighted" if q.image_path.name == "Axial_T2.nii.gz" else "DWI"
            assert expected in q.answer


def test_readers_accept_the_real_m3d_layout(tmp_path):
    """Files shaped like the public M3D release: .npy images, text paths, 'NA' choices."""
    case = tmp_path / "M3D_Cap_npy" / "ct_case" / "000006"
    case.mkdir(parents=True)
    (case / "text.txt").write_text("Large cyst in the left kidney.")
    (case / "Axial_non_contrast.npy").write_bytes(b"")
    rel = "M3D_Cap_npy/ct_case/000006/Axial_non_contrast.npy"
    text = "M3D_Cap_npy/ct_case/000006/text.txt"
    cap = {"train": [], "validation": [{"image": rel, "text": text}]}
    (tmp_path / "M3D_Cap_npy" / "M3D_Cap.json").write_text(json.dumps(cap))
    (tmp_path / "M3D-VQA").mkdir()
    with open(tmp_path / "M3D-VQA" / "M3D_VQA_val.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(M3D_COLUMNS)
        writer.writerow([rel, "Large cyst.", 3, "Which organ?", "Liver", "Left kidney", "NA", "NA",
                         "Left kidney", "B"])
    [item] = read_cap(tmp_path / "M3D_Cap_npy" / "M3D_Cap.json", "val")
    assert item.image_path == tmp_path / rel and item.text == "Large cyst in the left kidney."
    [q] = read_vqa(tmp_path / "M3D-VQA" / "M3D_VQA_val.csv")
    assert q.image_path == tmp_path / rel and q.question_type == 3
    assert q.choices == ("Liver", "Left kidney", "NA", "NA") and q.answer_choice == "B" and q.closed


def test_reader_errors_name_the_file_and_problem(tmp_path):
    path = tmp_path / "cap.json"
    path.write_text(json.dumps({"train": [{"image": "a.nii.gz", "text": "missing.txt"}]}))
    with pytest.raises(Med3DVLMError, match="no split 'test'"):
        read_cap(path, "test")
    with pytest.raises(Med3DVLMError, match="missing.txt"):
        read_cap(path, "train")
    bad = tmp_path / "vqa.csv"
    bad.write_text("Image Path,Question\nx.nii.gz,What?\n")
    with pytest.raises(Med3DVLMError, match="Answer"):
        read_vqa(bad)
    with pytest.raises(Med3DVLMError, match="nothing.json"):
        read_cap(tmp_path / "nothing.json")


def test_samples_are_small_and_described(tmp_path):
    files = write_samples(tmp_path)
    assert {f.name for f in files} == {
        "ct_phantom.nii.gz", "ct_phantom_report.txt", "ct_phantom_truth.json",
        "mr_phantom_t2.nii.gz", "mr_phantom_t2_report.txt", "mr_phantom_t2_truth.json"}
    for stem in ("ct_phantom", "mr_phantom_t2"):
        assert (tmp_path / f"{stem}.nii.gz").stat().st_size < 5_000_000
        truth = json.loads((tmp_path / f"{stem}_truth.json").read_text())
        assert isinstance(truth["seed"], int) and truth["findings"]
        pairs = {(f["organ"], f["kind"]) for f in truth["findings"]}
        assert mentioned_findings((tmp_path / f"{stem}_report.txt").read_text()) == pairs
    assert json.loads((tmp_path / "mr_phantom_t2_truth.json").read_text())["sequence"] == "T2"
