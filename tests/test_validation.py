"""validate_volume and the header checks: each refusal is one sentence naming the volume."""

from __future__ import annotations

import numpy as np
import pytest

from med3dvlm.errors import VolumeError
from med3dvlm.validation import check_memory, check_shape, validate_volume
from med3dvlm.volume import Volume

NAME = "knee_scan.nii.gz"


def _volume(array, affine=None) -> Volume:
    return Volume(np.asarray(array), np.eye(4) if affine is None else affine, source=NAME)


def _ramp(shape=(20, 24, 16)) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def test_a_good_volume_is_returned_unchanged():
    volume = _volume(_ramp())
    assert validate_volume(volume) is volume


def test_a_trailing_size_one_axis_is_dropped():
    volume = validate_volume(_volume(_ramp()[..., None]))
    assert volume.shape == (20, 24, 16) and volume.source == NAME


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((512, 512), r"is a 2D image \(512 x 512\); a 3D volume is needed"),
        ((64, 1, 48), r"is a 2D image \(64 x 48\); a 3D volume is needed"),
        ((20, 24, 16, 5), r"is a 4D series of 5 volumes \(20 x 24 x 16 x 5\); pick one with `--frame N`"),
        ((4, 4, 4, 2, 3), r"has 5 dimensions \(4 x 4 x 4 x 2 x 3\)"),
        ((20, 0, 16), r"is empty \(20 x 0 x 16 = 0 voxels\)"),
    ],
)
def test_wrong_shapes_are_named(shape, message):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    with pytest.raises(VolumeError, match=rf"^knee_scan\.nii\.gz {message}"):
        validate_volume(_volume(array))


def test_constant_volume_is_refused():
    with pytest.raises(VolumeError, match=r"knee_scan\.nii\.gz is constant \(every voxel is 0"):
        validate_volume(_volume(np.zeros((20, 24, 16), np.int16)))


def test_nan_and_inf_voxels_are_counted():
    array = _ramp()
    array[0, 0, :3] = np.nan
    array[5, 5, 5] = -np.inf
    with pytest.raises(VolumeError, match=r"knee_scan\.nii\.gz has 4 NaN or infinite voxels out of 7680"):
        validate_volume(_volume(array))


@pytest.mark.parametrize(
    ("affine", "message"),
    [
        (np.diag([1.0, 1.0, 0.0, 1.0]), "has an impossible voxel size or axis layout"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "has a NaN or infinite voxel-to-world transform"),
        (np.array([[1.0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "has an impossible voxel size"),
    ],
)
def test_broken_affines_are_refused(affine, message):
    with pytest.raises(VolumeError, match=rf"knee_scan\.nii\.gz {message}"):
        validate_volume(_volume(_ramp(), affine))


def test_non_numeric_voxels_are_refused():
    rgb = np.zeros((20, 24, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(VolumeError, match=r"knee_scan\.nii\.gz has .* voxels; grey values"):
        validate_volume(_volume(rgb))


def test_memory_estimate_is_in_gib():
    check_memory(NAME, (512, 512, 400), 2)  # 0.2 GiB: fine under the 4 GiB default
    with pytest.raises(VolumeError, match=r"knee_scan\.nii\.gz would need 8\.0 GiB .*than the 4\.0 GiB limit"):
        check_memory(NAME, (1024, 1024, 2048), 4)
    with pytest.raises(VolumeError, match=r"would need 0\.2 GiB .*more than the 0\.1 GiB limit"):
        check_memory(NAME, (512, 512, 400), 2, max_bytes=2**27)


def test_frame_choice_is_checked():
    check_shape(NAME, (20, 24, 16, 3), frame=2)
    check_shape(NAME, (20, 24, 16), frame=0)
    with pytest.raises(VolumeError, match=r"knee_scan\.nii\.gz has 3 volumes, so frame 3 does not exist \(use 0 to 2"):
        check_shape(NAME, (20, 24, 16, 3), frame=3)
    with pytest.raises(VolumeError, match=r"has 1 volume, so frame 1 does not exist"):
        check_shape(NAME, (20, 24, 16), frame=1)
