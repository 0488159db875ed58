"""Preprocessing: orientation to LPS, intensity policy, foreground crop, resize, dtype/device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3dvlm.errors import VolumeError
from med3dvlm.preprocess import (
    DEMO, M3D_LAMED, MED3DVLM, PRESETS, WINDOWS, PreprocessConfig, describe, preprocess,
)
from med3dvlm.volume import Volume

SPACING = (0.7, 0.8, 2.5)  # mm along L, P, S: all different, so a swapped axis shows


def lps_affine(spacing=SPACING) -> np.ndarray:
    """Array axes i -> L, j -> P, k -> S (what SimpleITK writes for an identity direction)."""
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def relayout(array: np.ndarray, affine: np.ndarray, perm, flips, fortran=False):
    """The same image stored with axes permuted by ``perm`` then flipped on ``flips``."""
    out = np.transpose(array, perm)
    columns = affine[:3, :3][:, list(perm)].copy()
    origin = affine[:3, 3].copy()
    for axis in flips:
        out = np.flip(out, axis)
        origin = origin + columns[:, axis] * (out.shape[axis] - 1)
        columns[:, axis] *= -1
    new = np.eye(4)
    new[:3, :3], new[:3, 3] = columns, origin
    out = np.asfortranarray(out) if fortran else np.ascontiguousarray(out)
    return out, new


LAYOUTS = {  # name: (perm, flips) relative to LPS storage
    "LPS": ((0, 1, 2), ()),
    "RAS": ((0, 1, 2), (0, 1)),
    "RAS-fortran": ((0, 1, 2), (0, 1)),
    "ILA": ((2, 0, 1), (0, 2)),
    "PIR": ((1, 2, 0), (1, 2)),
}


def layouts(array: np.ndarray, **volume_kw):
    for name, (perm, flips) in LAYOUTS.items():
        stored, affine = relayout(array, lps_affine(), perm, flips, fortran=name.endswith("fortran"))
        yield name, Volume(stored, affine, **volume_kw)


def random_lps(shape_ijk=(12, 10, 6), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 0.9, shape_ijk).astype(np.float32)


# ----- presets and config --------------------------------------------------------------------------
def test_presets_shapes():
    assert MED3DVLM.shape == (128, 256, 256)
    assert M3D_LAMED.shape == (32, 256, 256)
    assert DEMO.shape == (32, 128, 128)
    assert PRESETS == {"med3dvlm": MED3DVLM, "m3d_lamed": M3D_LAMED, "demo": DEMO}
    assert all(p.orientation == "LPS" and p.crop_foreground for p in PRESETS.values())


@pytest.mark.parametrize("bad", [
    dict(intensity="zscore"), dict(shape=(0, 4, 4)), dict(orientation="LLS"), dict(window=(40, 0)),
    dict(body_region="knee"), dict(percentiles=(99, 1)), dict(resize_mode="nearest"),
    dict(spacing=(1, 1, 1)),  # spacing needs crop_pad
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        PreprocessConfig(**bad)


def test_config_lists_become_tuples():
    assert PreprocessConfig(shape=[4, 5, 6], window=[40, 400]).shape == (4, 5, 6)


# ----- orientation ---------------------------------------------------------------------------------
def test_lps_marker_lands_at_same_index_in_every_layout():
    data = random_lps()
    data[-1, -1, -1] = 1.0  # the left-posterior-superior corner voxel
    config = PreprocessConfig(shape=(6, 10, 12))  # (D, H, W) = (k, j, i) sizes: no resampling
    outputs = {}
    for name, volume in layouts(data):
        out = preprocess(volume, config)
        assert out.shape == (1, 6, 10, 12), name
        flat = int(out.argmax())
        assert np.unravel_index(flat, (6, 10, 12)) == (5, 9, 11), name
        outputs[name] = out
    expected = torch.from_numpy(data.transpose(2, 1, 0).copy())[None]
    for name, out in outputs.items():
        assert torch.equal(out, expected), name


def test_layouts_agree_through_window_crop_and_resize():
    data = np.full((24, 20, 12), -1000, np.int16)
    data[3:20, 4:17, 2:11] = np.random.default_rng(1).integers(-100, 300, (17, 13, 9))
    config = PreprocessConfig(shape=(8, 16, 16))
    outputs = {name: preprocess(v, config) for name, v in layouts(data, modality="CT")}
    reference = outputs.pop("LPS")
    assert reference.shape == (1, 8, 16, 16)
    for name, out in outputs.items():
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0, msg=name)


def test_describe_names_reorientation_window_crop_and_resize():
    data = np.full((24, 20, 12), -1000, np.int16)
    data[3:20, 4:17, 2:11] = 50
    stored, affine = relayout(data, lps_affine(), (0, 1, 2), (0, 1))
    steps = describe(Volume(stored, affine, modality="CT"), PreprocessConfig(shape=(8, 16, 16)))
    assert steps[0].startswith("reorient RAS -> LPS (flip H, W)")
    assert "L40/W400 (abdomen)" in steps[1]
    assert steps[2] == "crop foreground (> 0 after scaling): 12 x 20 x 24 -> 9 x 13 x 17"
    assert steps[3] == "resize (trilinear) 9 x 13 x 17 -> 8 x 16 x 16"


def test_oblique_affine_uses_nearest_axes_and_says_so():
    data = random_lps()
    angle = np.radians(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = lps_affine()
    affine[:3, :3] = rotation @ affine[:3, :3]
    config = PreprocessConfig(shape=(6, 10, 12))
    oblique = Volume(data, affine)
    assert "oblique (up to 10.0 deg off axis)" in describe(oblique, config)[0]
    assert "oblique" not in describe(Volume(data, lps_affine()), config)[0]
    assert torch.equal(preprocess(oblique, config), preprocess(Volume(data, lps_affine()), config))


# ----- intensity -----------------------------------------------------------------------------------
def test_ct_window_maps_level_minus_half_width_to_0_and_plus_half_width_to_1():
    level, width = WINDOWS["abdomen"]
    values = [-1000, level - width / 2, level, level + width / 2, 3000]
    data = np.zeros((5, 4, 3), np.float32)
    data[:, 0, 0] = values
    data[:, 1:, :] = -1000  # rest is air
    config = PreprocessConfig(shape=(3, 4, 5), crop_foreground=False)
    out = preprocess(Volume(data, lps_affine(), modality="CT"), config)[0]
    assert out[0, 0, :].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_unknown_modality_in_hu_range_is_windowed_and_explicit_window_wins():
    data = np.full((6, 5, 4), -1024, np.int16)
    data[:3] = 100
    volume = Volume(data, lps_affine())
    config = PreprocessConfig(shape=(4, 5, 6), crop_foreground=False, window=(-600, 1500))
    assert "L-600/W1500 (given)" in describe(volume, config)[1]
    out = preprocess(volume, config)[0]
    assert torch.allclose(out[0, 0], torch.tensor([1450 / 1500] * 3 + [326 / 1500] * 3))


def test_mr_percentile_normalisation_per_volume():
    rng = np.random.default_rng(2)
    data = rng.gamma(2.0, 100.0, (10, 8, 6)).astype(np.float32)
    volume = Volume(data, lps_affine(), modality="MR", sequence="T2")
    config = PreprocessConfig(shape=(6, 8, 10), crop_foreground=False)
    low, high = np.percentile(data, [0.5, 99.5])
    expected = np.clip((data - low) / (high - low), 0, 1).transpose(2, 1, 0)
    out = preprocess(volume, config)[0]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    assert "MR (T2) percentiles p0.5-p99.5" in describe(volume, config)[1]


def test_unknown_modality_uses_min_max():
    data = np.arange(5 * 4 * 3, dtype=np.uint16).reshape(5, 4, 3) * 10 + 100
    out = preprocess(Volume(data, lps_affine()), PreprocessConfig(shape=(3, 4, 5), crop_foreground=False))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[0, 0, 0, 1]) == pytest.approx(120 / 590)  # raw 220 at i = 1, j = k = 0


def test_window_leaving_volume_blank_is_a_volume_error():
    data = np.full((6, 5, 4), -1000, np.int16)
    data[2, 2, 2] = -900
    with pytest.raises(VolumeError, match="no voxel above -160"):
        preprocess(Volume(data, lps_affine(), modality="CT", source="air.nii.gz"), PreprocessConfig(shape=(4, 4, 4)))


def test_invalid_volume_is_refused():
    with pytest.raises(VolumeError):
        preprocess(Volume(np.zeros((8, 8, 8), np.float32), lps_affine()), DEMO)  # constant


# ----- already model-ready data --------------------------------------------------------------------
def test_model_ready_volume_passes_unchanged_except_orientation():
    # Official demo data: [0, 1] at the model shape, zero border kept, maximum below 1.
    data = np.zeros((16, 12, 8), np.float32)
    data[2:14, 1:11, 1:7] = np.random.default_rng(3).uniform(0.0, 0.8, (12, 10, 6))
    config = PreprocessConfig(shape=(8, 12, 16))
    expected = torch.from_numpy(data.transpose(2, 1, 0).copy())[None]  # SimpleITK GetArrayFromImage
    for name, volume in layouts(data, modality="CT"):
        assert torch.equal(preprocess(volume, config), expected), name
    steps = describe(Volume(data, lps_affine()), config)
    assert steps == ["already LPS (no reorientation); model axes (D, H, W) = stored (k, j, i)",
                     "already model-ready: in [0, 1] at 8 x 12 x 16, passed unchanged"]


def test_unit_range_volume_at_other_shape_is_cropped_and_resized_not_rescaled():
    data = np.zeros((16, 12, 8), np.float32)
    data[4:12, 2:10, 2:6] = 0.6
    out = preprocess(Volume(data, lps_affine()), PreprocessConfig(shape=(4, 4, 4)))
    assert torch.allclose(out, torch.full((1, 4, 4, 4), 0.6))


# ----- crop and resize -----------------------------------------------------------------------------
def test_foreground_crop_removes_zero_border():
    data = np.zeros((20, 16, 12), np.float32)
    data[5:15, 4:12, 3:9] = 2.0
    data[5, 4, 3] = 4.0
    volume = Volume(data, lps_affine())
    cropped = preprocess(volume, PreprocessConfig(shape=(6, 8, 10)))[0]
    assert cropped.shape == (6, 8, 10)
    assert float(cropped.min()) == 0.5 and float(cropped[0, 0, 0]) == 1.0  # block fills the output
    whole = preprocess(volume, PreprocessConfig(shape=(6, 8, 10), crop_foreground=False))[0]
    assert float(whole.min()) == 0.0


def test_trilinear_resize_matches_torch_interpolate():
    data = np.random.default_rng(4).uniform(0.05, 1.0, (9, 7, 5)).astype(np.float32)
    out = preprocess(Volume(data, lps_affine()), PreprocessConfig(shape=(10, 4, 6)))
    expected = F.interpolate(torch.from_numpy(data.transpose(2, 1, 0).copy())[None, None], size=(10, 4, 6),
                             mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_crop_pad_keeps_scale_centres_and_pads_with_zeros():
    data = np.zeros((10, 6, 4), np.float32)  # (i, j, k) -> model (D, H, W) = (4, 6, 10)
    data[:, :, :] = np.arange(10, dtype=np.float32)[:, None, None] + 1
    config = PreprocessConfig(shape=(8, 6, 4), resize_mode="crop_pad", crop_foreground=False,
                              intensity="minmax")
    out = preprocess(Volume(data, lps_affine()), config)[0]
    assert out.shape == (8, 6, 4)
    assert torch.equal(out[:2], torch.zeros(2, 6, 4)) and torch.equal(out[-2:], torch.zeros(2, 6, 4))
    # W: 10 -> 4 keeps the centre columns i = 3..6, i.e. raw 4..7, min-max over 1..10.
    assert torch.allclose(out[2:6, 0, :], torch.tensor([3.0, 4.0, 5.0, 6.0]).div(9).expand(4, 4))


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (0, 1)), ((2, 0, 1), (1,)), ((1, 2, 0), (0, 2))])
def test_crop_pad_gives_the_same_input_however_the_volume_is_stored(perm, flips):
    """Odd differences between size and shape leave the extra voxel at the same end of each model
    axis, so one image stored two ways gives one model input (padding on D, cropping on H and W)."""
    data = np.random.default_rng(8).uniform(0.1, 1.0, (11, 9, 5)).astype(np.float32)
    config = PreprocessConfig(shape=(8, 6, 8), resize_mode="crop_pad", crop_foreground=False)
    expected = preprocess(Volume(data, lps_affine()), config)
    assert torch.equal(preprocess(Volume(*relayout(data, lps_affine(), perm, flips)), config), expected)


def test_crop_pad_with_spacing_resamples_to_millimetres():
    data = np.random.default_rng(5).uniform(0.1, 1.0, (10, 8, 4)).astype(np.float32)
    config = PreprocessConfig(shape=(12, 8, 8), resize_mode="crop_pad", spacing=(1.25, 1.6, 1.4),
                              crop_foreground=False)
    volume = Volume(data, lps_affine())
    assert describe(volume, config)[2] == "resample 2.5x0.8x0.7 mm -> 1.25x1.6x1.4 mm: 4 x 8 x 10 -> 8 x 4 x 5"
    out = preprocess(volume, config)[0]
    assert out.shape == (12, 8, 8)
    assert float(out[:2].abs().sum()) == 0.0 and float(out[2:10, 2:6, 1:6].min()) > 0.0


# ----- dtype, device, caller's data ----------------------------------------------------------------
def test_dtype_device_and_input_untouched():
    data = np.random.default_rng(6).normal(0, 300, (12, 10, 6)).astype(np.float32)
    before = data.copy()
    config = dataclasses.replace(DEMO, shape=(4, 6, 8), dtype=torch.float16)
    out = preprocess(Volume(data, lps_affine(), modality="CT"), config, device="cpu")
    assert out.dtype == torch.float16 and out.device.type == "cpu" and out.is_contiguous()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    np.testing.assert_array_equal(data, before)


@pytest.mark.parametrize("dtype", [">i2", ">u2", "<u2", "bool"])
def test_read_only_big_endian_unsigned_and_bool_input(dtype):
    data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 3 % (2 if dtype == "bool" else 1000)).astype(dtype)
    data.flags.writeable = False
    out = preprocess(Volume(data, lps_affine()), PreprocessConfig(shape=(4, 5, 6), crop_foreground=False))
    expected = torch.from_numpy(data.astype(np.float32).transpose(2, 1, 0) / data.max())[None]
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    data = np.full((40, 36, 20), -1000, np.int16)
    data[5:35, 6:30, 2:18] = np.random.default_rng(7).integers(-200, 400, (30, 24, 16))
    stored, affine = relayout(data, lps_affine(), (0, 1, 2), (0, 1), fortran=True)
    volume = Volume(stored, affine, modality="CT")
    config = PreprocessConfig(shape=(8, 16, 16))
    on_gpu = preprocess(volume, config, device="cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), preprocess(volume, config), atol=1e-5, rtol=0)
