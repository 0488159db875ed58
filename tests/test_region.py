"""Questions about a region: only the region (plus its margin) reaches the model, at a higher
resolution; provenance and the token cache know the region; a chosen CT window; bad input."""

import json
import warnings

import numpy as np
import pytest

import med3dvlm.model_input
from box_models import body_volume, box_detector, box_pipeline, centres, reoriented
from med3dvlm.cli import main
from med3dvlm.errors import Med3DVLMError, RegionError
from med3dvlm.model_input import WindowWarning
from med3dvlm.preprocess import PreprocessConfig, preprocess
from med3dvlm.region import MARGIN_MM, crop_to_region
from med3dvlm.resources import sample_path
from med3dvlm.volume import Volume

CT = str(sample_path("ct_phantom.nii.gz"))
REGION = ((-2.0, 18.0, -20.0), (10.0, 30.0, 5.0))  # RAS mm, inside the body of body_volume()
INPUT = (16, 32, 32)
SMALL = ((40.0, 40.0, 45.0), (41.0, 41.0, 46.0))  # with the margin, too few voxels of coarse_volume()


def coarse_volume() -> Volume:
    """body_volume() with 4 x 4 x 10 mm voxels, whose origin is at (0, 0, 0)."""
    return Volume(body_volume().array, np.diag([4.0, 4.0, 10.0, 1.0]), modality="CT")


@pytest.fixture(scope="module")
def pipe():
    return box_pipeline(detector=box_detector())


def near(volume, region=REGION) -> np.ndarray:
    """Voxels whose centres lie in the region or within the margin of it."""
    xyz, low, high = centres(volume), np.min(region, axis=0), np.max(region, axis=0)
    return np.all((xyz >= low - MARGIN_MM - 1e-6) & (xyz <= high + MARGIN_MM + 1e-6), axis=-1)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_crop_keeps_exactly_the_voxels_near_the_region_where_they_were(codes):
    volume = reoriented(body_volume(), codes)
    cropped, record = crop_to_region(volume, REGION, INPUT, "LPS")
    wanted = near(volume)
    assert cropped.array.size == wanted.sum() and np.array_equal(np.sort(cropped.array, axis=None),
                                                                 np.sort(volume.array[wanted]))
    # Same voxels, same world positions.
    np.testing.assert_allclose(np.sort(centres(cropped).reshape(-1, 3), axis=0),
                               np.sort(centres(volume)[wanted], axis=0), atol=1e-9)
    assert record["ras"] == [list(c) for c in REGION] and record["margin_mm"] == MARGIN_MM
    assert record["shape"] == list(cropped.shape)


def test_pipeline_sends_only_the_region_and_provenance_names_it(pipe, monkeypatch):
    volume = body_volume()
    shown = []
    real = med3dvlm.model_input.prepare
    monkeypatch.setattr(med3dvlm.model_input, "prepare", lambda v, *a, **k: shown.append(v) or real(v, *a, **k))
    pixels = pipe.pixels(volume, region=REGION)
    assert len(shown) == 1 and shown[0].array.size == near(volume).sum()
    assert pixels.shape[2:] == INPUT
    # What lies beyond the region and its margin does not matter; what lies in it does.
    changed = volume.array.copy()
    changed[~near(volume)] = 150
    assert pipe.pixels(Volume(changed, volume.affine, modality="CT"), region=REGION).equal(pixels)
    changed[near(volume)] += 30
    assert not pipe.pixels(Volume(changed, volume.affine, modality="CT"), region=REGION).equal(pixels)
    record = pipe.provenance("ask", volume, region=REGION)["preprocessing"]["volumes"][0]
    assert record["region"]["ras"] == [list(c) for c in REGION]
    assert record["steps"][0].startswith("crop to the region R -2 to 10, A 18 to 30, S -20 to 5 mm")


def test_token_cache_keys_on_region_and_window(pipe):
    volume = body_volume()
    pipe._tokens.clear()
    calls = []
    handle = pipe.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        whole = pipe.encode(volume)
        part = pipe.encode(volume, region=REGION)
        again = pipe.encode(volume, region=REGION)
        with pytest.warns(WindowWarning):
            windowed = pipe.encode(volume, window=(0, 300))
    finally:
        handle.remove()
    assert len(calls) == 3 and again is part
    assert not whole.equal(part) and not whole.equal(windowed)


def test_detection_of_a_region_reads_only_the_region(pipe):
    volume = body_volume("MR")
    result = pipe.detect({"T2": volume}, region=REGION)
    changed = volume.array.copy()
    changed[~near(volume)] = 0
    same = pipe.detect({"T2": Volume(changed, volume.affine, modality="MR")}, region=REGION)
    assert same.rows() == result.rows() and result.rows() != pipe.detect({"T2": volume}).rows()
    record = pipe.provenance("detect", {"T2": volume}, region=REGION)["preprocessing"]["volumes"][0]
    assert record["sequence"] == "T2" and record["region"]["voxels"]


def test_a_given_window_replaces_the_presets_with_a_warning(pipe):
    volume = body_volume()
    with pytest.warns(WindowWarning, match="trained with the fixed CT window L40/W400"):
        pixels = pipe.pixels(volume, window=(50, 200))
    # The same as a preset made with that window, not the preset's own.
    assert pixels[0].float().equal(preprocess(volume, PreprocessConfig(shape=INPUT, window=(50, 200))))
    assert not pixels.equal(pipe.pixels(volume))
    with pytest.warns(WindowWarning):
        record = pipe.provenance("report", volume, window=(50, 200))["preprocessing"]["volumes"][0]
    assert record["window"] == [50, 200] and record["steps"][1].startswith("CT window L50/W200 (given)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.pixels(volume, window=(40, 400))  # the preset's own window: nothing to warn about
    with pytest.raises(Med3DVLMError, match="positive width"):
        pipe.pixels(volume, window=(40, 0))


@pytest.mark.parametrize("region, message", [
    (((0, 10, 0), (0, 20, 10)), "The region is empty: its two corners have the same R-L coordinate"),
    (((500, 500, 500), (520, 520, 520)), "The region \\(R 500 to 520, A 500 to 520, S 500 to 520\\) lies outside"),
    (SMALL, "The region is too small for the model's 16 x 32 x 32 input, which may magnify it at most 4 times: "
            "with its 10 mm margin, along S-I it spans 2 voxels \\(20.0 mm\\) and needs at least 4 \\(40.0 mm\\); "
            "along A-P it spans 5 voxels \\(20.0 mm\\) and needs at least 8 \\(32.0 mm\\); along R-L"),
    (((1, 2), (3, 4)), "A region is two opposite corners"),
])
def test_bad_regions_get_one_sentence(pipe, region, message):
    with pytest.raises(RegionError, match=message) as caught:
        pipe.report(coarse_volume(), region=region)
    text = str(caught.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0


def test_cli_answers_about_a_region_and_records_it(capsys):
    region = ["-100", "-80", "-250", "50", "60", "-150"]
    assert main(["ask", CT, "What is the contrast phase of this CT scan?", "--region", *region, "--json",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = printed["provenance"]["preprocessing"]["volumes"][0]
    assert record["region"]["ras"] == [[-100, -80, -250], [50, 60, -150]]
    assert record["region"]["shape"] == [74, 70, 23]
    assert main(["ask", CT, "What is seen?", "--region", "0", "0", "0", "0", "5", "5"]) == 2
    assert "The region is empty" in capsys.readouterr().err
