"""Provenance: the concrete preprocessing of a volume, the weights digest (remembered per file
version), the pipeline's record; and follow-ups that do not read or hash a volume again, for
files and for volumes as the model server holds them (read-only voxels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import med3dvlm
from med3dvlm import provenance
from med3dvlm.preprocess import DEMO, applied, preprocess
from med3dvlm.resources import sample_path
from med3dvlm import volume_cache
from med3dvlm.server.volumes import decode_upload
from med3dvlm.volume import Volume
from med3dvlm.wire import volume_digest, wire_chunks, wire_header

CT = sample_path("ct_phantom.nii.gz")


@pytest.fixture(scope="module")
def pipe():
    return med3dvlm.load("demo", device="cpu")


def test_applied_preprocessing_names_window_crop_box_and_shapes():
    array = np.full((20, 30, 10), -1000, np.int16)  # (i, j, k), stored RAS
    array[2:5, 7:12, 3:6] = 50
    made = applied(Volume(array, np.eye(4), modality="CT"), DEMO)
    # LPS model axes (D, H, W) = (k, j, i), with j and i counted from the other end.
    assert made["reoriented_shape"] == [10, 30, 20] and made["orientation"] == "LPS"
    assert made["crop_box"] == [[3, 6], [30 - 12, 30 - 7], [20 - 5, 20 - 2]]
    assert (made["intensity"], made["window"], made["range"]) == ("window", [40.0, 400.0], [-160.0, 240.0])
    assert made["output_shape"] == [32, 128, 128] and made["steps"][0].startswith("reorient RAS -> LPS")
    assert json.loads(json.dumps(made)) == made  # plain JSON


def test_crop_box_is_the_box_preprocess_resizes():
    array = np.full((40, 50, 20), -1000, np.int16)
    array[4:20, 10:30, 5:15] = np.random.default_rng(0).integers(-100, 240, (16, 20, 10))
    volume = Volume(array, np.diag([-1.0, 1.0, 1.0, 1.0]), modality="CT")  # stored LAS: only j is flipped
    (d0, d1), (h0, h1), (w0, w1) = applied(volume, DEMO)["crop_box"]
    lps = np.transpose(array, (2, 1, 0))[:, ::-1, :]  # (k, j, i), P = -A
    box = Volume(np.ascontiguousarray(lps[d0:d1, h0:h1, w0:w1].transpose(2, 1, 0)), np.eye(4) * [-1, -1, 1, 1],
                 modality="CT")  # the cropped block, stored LPS: preprocessing it crops nothing more
    np.testing.assert_allclose(preprocess(volume, DEMO), preprocess(box, DEMO), atol=1e-6)


def test_weights_digest_is_remembered_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "siglip").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"a" * 1000)
    (folder / "siglip" / "model.safetensors").write_bytes(b"b" * 10)
    (folder / "config.json").write_text("{}")  # not weights
    opened = []
    monkeypatch.setattr(provenance, "open", lambda *a: opened.append(a[0]) or open(*a), raising=False)
    first = provenance.weights_digest(folder)
    assert len(opened) == 2 and provenance.weights_digest(folder) == first and len(opened) == 2  # stat only
    renamed = folder.rename(tmp_path / "elsewhere")
    assert provenance.weights_digest(renamed) == first  # named by content, not by folder
    (renamed / "model.safetensors").write_bytes(b"a" * 999 + b"c")
    assert provenance.weights_digest(renamed) != first and len(opened) == 5


def test_pipeline_record_says_what_produced_an_answer(pipe):
    text = pipe.report(CT, max_new_tokens=8)
    made = pipe.provenance("report", CT, max_new_tokens=8)
    assert text and made["task"] == "report" and made["package"] == f"med3dvlm {med3dvlm.__version__}"
    assert made["weights_blake2b"] == pipe.weights and len(pipe.weights) == 32
    assert (made["device"], made["dtype"], made["quantization"]) == ("cpu", "float32", None)
    assert made["generation"] == {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "top_p": 0.9,
                                  "repetition_penalty": 1.0}
    (volume,) = made["preprocessing"]["volumes"]
    assert volume == {**applied(med3dvlm.read_volume(CT), pipe.preprocess_config), "region": None}  # the whole volume
    assert made["preprocessing"]["preset"]["shape"] == [32, 128, 128]
    assert made["created"] and (made["seed"], made["deterministic"]) == (None, False)  # not seeded here


def as_the_server_holds_it(volume: Volume) -> Volume:
    """The volume decoded from an upload, exactly as the model server stores it."""
    return decode_upload(volume_digest(volume), wire_header(volume), b"".join(wire_chunks(volume)), "raw")


def test_follow_ups_about_a_server_volume_do_not_hash_it_again(pipe, monkeypatch):
    hashed = []
    real = volume_cache.volume_digest
    monkeypatch.setattr(volume_cache, "volume_digest", lambda v: hashed.append(v) or real(v))
    stored = as_the_server_holds_it(med3dvlm.read_volume(CT))
    first = pipe.ask(stored, "Is there a cyst?")
    assert pipe.ask(stored, "Is there a cyst?") == first
    pipe.provenance("ask", stored)
    assert hashed == []  # the pipeline knows the upload by the digest the server checked it against

    writable = Volume(stored.array.copy(), stored.affine, modality="CT")  # may change in place: hashed each time
    pipe.ask(writable, "Is there a cyst?")
    writable.array[:] = writable.array[::-1]
    pipe.ask(writable, "Is there a cyst?")
    assert len(hashed) == 2 and all(v is writable for v in hashed)
