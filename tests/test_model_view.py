"""The model's view: its input, placed over the scan exactly, and the box of the scan it covers."""

import json

import nibabel as nib
import numpy as np
import pytest

from box_models import BODY, INPUT, body_volume, centres, reoriented
from med3dvlm.cli import main
from med3dvlm.geometry import to_volume_grid
from med3dvlm.model_view import model_view
from med3dvlm.preprocess import PreprocessConfig
from med3dvlm.resources import sample_path
from med3dvlm.volume import Volume

CT = str(sample_path("ct_phantom.nii.gz"))
ORIENTATIONS = ["RAS", "LPS", "PIR", "SLA"]


def bounds(points) -> np.ndarray:
    """(2, 3): the lowest and highest R, A, S of some points (corners, in whatever order)."""
    points = np.asarray(points, float)
    return np.stack([points.min(axis=0), points.max(axis=0)])


def edge_corners(affine, shape) -> np.ndarray:
    """RAS of the 8 outer corners (voxel edges) of a grid of ``shape`` placed by ``affine``."""
    edges = [[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
             for k in (-0.5, shape[2] - 0.5)]
    return (np.asarray(affine) @ np.array(edges).T)[:3].T


def ramp(codes: str):
    """A volume whose value is a linear function of RAS position (so any linear resampling of it
    can be checked at every point), stored as ``codes``; and that function."""
    def value(xyz):
        return 0.4 * xyz[..., 0] + 0.3 * xyz[..., 1] + 0.2 * xyz[..., 2] + 50.0

    volume = Volume.from_numpy(np.zeros((40, 36, 20), np.float32), spacing=(0.8, 0.9, 2.5), origin=(-10, 20, -30))
    volume.array = value(centres(volume)).astype(np.float32)
    return reoriented(volume, codes), value


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_view_and_its_box_cover_exactly_the_cropped_body(codes):
    """The foreground crop keeps the tissue box; the view's outer corners and the box's corners are
    that box's corners in world space, computed here from the original (RAS) volume's affine."""
    original = body_volume()
    expected = bounds(edge_corners(original.affine @ _shift(BODY), [b.stop - b.start for b in BODY]))
    view = model_view(reoriented(original, codes), PreprocessConfig(shape=INPUT))
    assert view.volume.shape == INPUT
    np.testing.assert_allclose(bounds(edge_corners(view.volume.affine, INPUT)), expected, atol=1e-9)
    np.testing.assert_allclose(bounds(view.box_ras), expected, atol=1e-9)
    sizes = sorted(b - a for a, b in view.box_voxels)
    assert sizes == sorted(b.stop - b.start for b in BODY)


def _shift(box) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return shift


CONFIGS = {
    "trilinear": PreprocessConfig(shape=(12, 20, 24), crop_foreground=False, intensity="minmax"),
    "crop_pad": PreprocessConfig(shape=(25, 41, 47), crop_foreground=False, intensity="minmax", resize_mode="crop_pad"),
    "spacing": PreprocessConfig(shape=(12, 20, 24), crop_foreground=False, intensity="minmax", resize_mode="crop_pad",
                                spacing=(3.0, 1.3, 1.1)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("region", [None, ((-5.0, 25.0, -20.0), (10.0, 40.0, 5.0))])
def test_each_view_voxel_shows_the_scan_where_the_affine_puts_it(name, codes, region):
    """On a linear ramp, linear resampling is exact: every model voxel must hold the (scaled) scan
    value at the world position that the view's affine gives it; padding is 0."""
    volume, value = ramp(codes)
    view = model_view(volume, CONFIGS[name], region=region)
    seen = volume.array[tuple(slice(*s) for s in view.preprocessing["region"]["voxels"])] if region else volume.array
    expected = (value(centres(view.volume)) - seen.min()) / (seen.max() - seen.min())
    inner = tuple(slice(1, n - 1) for n in view.volume.shape)  # edge voxels clamp at the crop's border
    shown, expected = view.volume.array[inner], expected[inner]
    data = shown > 0
    assert data.mean() > 0.5
    np.testing.assert_allclose(shown[data], expected[data], atol=1e-5)


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_maps_on_the_model_grid_carry_back_onto_the_scan(codes):
    """The view itself carried back lands on the body (in the window), keeps its sum, and is 0 elsewhere."""
    volume = reoriented(body_volume(), codes)
    view = model_view(volume, PreprocessConfig(shape=INPUT))
    back = to_volume_grid(view.volume.array, volume, view.preprocessing)
    windowed = np.clip((volume.array.astype(np.float64) + 160) / 400, 0, 1)
    inside = np.zeros(volume.shape, bool)
    inside[tuple(slice(*s) for s in view.box_voxels)] = True
    assert not back[~inside].any()
    assert back.sum() == pytest.approx(view.volume.array.sum(), rel=1e-3)
    # Mean values agree (the resize averages texture, so not voxel for voxel).
    scale = np.prod(INPUT) / inside.sum()
    assert back[inside].mean() / scale == pytest.approx(windowed[inside].mean(), rel=0.02)


def test_cli_writes_the_view_over_the_scan(tmp_path, capsys):
    out = tmp_path / "view.nii.gz"
    assert main(["view", CT, "--preset", "demo", "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = nib.load(out)
    assert written.shape == (32, 128, 128) and np.allclose(written.affine, printed["affine"])
    np.testing.assert_allclose(bounds(edge_corners(written.affine, written.shape)), bounds(printed["box_ras"]),
                               atol=1e-3)
    source = nib.load(CT)
    spans = printed["box_voxels"]
    box = bounds(edge_corners(source.affine @ _shift([slice(a, b) for a, b in spans]), [b - a for a, b in spans]))
    np.testing.assert_allclose(bounds(printed["box_ras"]), box, atol=1e-3)
    assert 0.0 <= float(np.min(written.dataobj)) and float(np.max(written.dataobj)) <= 1.0
