"""Reading and writing NIfTI, NRRD and DICOM: geometry in RAS, voxel values, modality guesses, refusals."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from med3dvlm.errors import VolumeError
from med3dvlm.readers import guess_modality, read_volume, write_dicom_series, write_volume
from med3dvlm.volume import Volume

SHAPE = (20, 24, 16)
MARK = (13, 5, 11)  # the one voxel brighter than all others


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


AFFINES = {
    "LPS": _affine(np.diag([-0.75, -0.5, 2.5]), [40.25, 30.5, -12.0]),
    "oblique": _affine(_rotation([1, 2, 3], 0.4) @ np.diag([0.8, 1.1, 3.0]), [-20.5, 11.25, 7.0]),
    "flipped": _affine(np.diag([1.5, -0.6, -2.0]), [-10.0, 25.0, 31.5]),
}


def _phantom(affine: np.ndarray, dtype=np.float32, modality: str = "CT") -> Volume:
    values = np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(dtype)
    values[MARK] = 3000
    return Volume(values, affine, modality=modality, source="phantom")


def _world(volume: Volume) -> np.ndarray:
    index = np.unravel_index(np.argmax(volume.array), volume.shape)
    return (volume.affine @ [*index, 1.0])[:3]


def _in_grid_of(volume: Volume, reading: Volume) -> np.ndarray:
    """The reading's voxels at the volume's voxel positions (same grid up to axis order and flips)."""
    to_reading = np.linalg.inv(reading.affine) @ volume.affine
    np.testing.assert_allclose(to_reading, np.rint(to_reading), atol=1e-4)
    ijk = np.indices(volume.shape).reshape(3, -1)
    mapped = np.rint(to_reading[:3, :3] @ ijk + to_reading[:3, 3:]).astype(int)
    return reading.array[tuple(mapped)].reshape(volume.shape)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr"])
@pytest.mark.parametrize("layout", sorted(AFFINES))
def test_round_trip_keeps_ras_affine_and_voxels(tmp_path, suffix, layout):
    volume = _phantom(AFFINES[layout])
    path = write_volume(volume, tmp_path / f"scan{suffix}")
    back = read_volume(path)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(back.array, volume.array, atol=1e-5)
    assert back.orientation == volume.orientation
    assert back.modality == "CT" and back.source == str(path)


def test_nrrd_space_fields_become_ras(tmp_path):
    data = _phantom(np.eye(4)).array
    directions = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # one row per axis
    spaces = {"left-posterior-superior": [-1, -1, 1], "RAS": [1, 1, 1], "left-anterior-superior": [-1, 1, 1]}
    for space, signs in spaces.items():
        path = tmp_path / f"{space}.nrrd"
        header = {"space": space, "space directions": directions, "space origin": [10.0, 20.0, 30.0]}
        nrrd.write(str(path), data, header)
        affine = read_volume(path).affine
        np.testing.assert_allclose(affine[:3, :3], np.diag(signs) @ directions.T)
        np.testing.assert_allclose(affine[:3, 3], np.multiply(signs, [10.0, 20.0, 30.0]))


def test_nrrd_list_axis_first_is_a_4d_series(tmp_path):
    frames = np.stack([_phantom(np.eye(4)).array + 10 * f for f in range(3)])  # axis 0 = list
    path = tmp_path / "dwi.nrrd"
    header = {"space": "LPS", "kinds": ["list", "domain", "domain", "domain"],
              "space directions": [[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]]}
    nrrd.write(str(path), frames, header)
    with pytest.raises(VolumeError, match=r"dwi\.nrrd is a 4D series of 3 volumes.*--frame N"):
        read_volume(path)
    picked = read_volume(path, frame=2)
    np.testing.assert_array_equal(picked.array, frames[2])
    np.testing.assert_allclose(picked.spacing, (1.0, 1.0, 2.0))


def test_nifti_applies_scl_slope_and_inter(tmp_path):
    stored = np.random.default_rng(1).integers(0, 3000, SHAPE).astype(np.int16)
    for slope, inter, dtype in [(1.0, -1024.0, np.int16), (0.5, -1024.0, np.float32)]:
        image = nib.Nifti1Image(stored, np.eye(4))
        image.header.set_slope_inter(slope, inter)
        path = tmp_path / f"ct_{slope}.nii.gz"
        nib.save(image, path)
        back = read_volume(path)
        assert back.array.dtype == dtype
        np.testing.assert_array_equal(back.array, stored * slope + inter)


def test_nifti_4d_series_needs_a_frame(tmp_path):
    frames = np.stack([_phantom(np.eye(4)).array * (f + 1) for f in range(3)], axis=-1)
    path = tmp_path / "perfusion.nii.gz"
    nib.save(nib.Nifti1Image(frames, np.eye(4)), path)
    with pytest.raises(VolumeError, match=r"perfusion\.nii\.gz is a 4D series of 3 volumes.*--frame N"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(path, frame=1).array, frames[..., 1])
    with pytest.raises(VolumeError, match=r"perfusion\.nii\.gz has 3 volumes, so frame 5 does not exist"):
        read_volume(path, frame=5)


def test_marked_voxel_has_one_world_position_in_all_formats(tmp_path):
    volume = _phantom(AFFINES["oblique"], dtype=np.int16)
    write_volume(volume, tmp_path / "scan.nii.gz")
    write_volume(volume, tmp_path / "scan.nrrd")
    write_dicom_series(volume, tmp_path / "dicom")
    readings = [read_volume(tmp_path / name) for name in ("scan.nii.gz", "scan.nrrd", "dicom")]
    expected = (volume.affine @ [*MARK, 1.0])[:3]
    for reading in readings:
        np.testing.assert_allclose(_world(reading), expected, atol=1e-4)
        assert reading.array.max() == 3000


@pytest.mark.parametrize("layout", sorted(AFFINES))
def test_dicom_shuffled_files_with_rescale_give_hu(tmp_path, layout):
    volume = _phantom(AFFINES[layout])
    volume.array[:] = np.round(volume.array * 2) / 2  # multiples of the slope 0.5
    files = write_dicom_series(volume, tmp_path / "series", slope=0.5, intercept=-1024.0)
    stored = pydicom.dcmread(files[0]).pixel_array
    assert stored.dtype == np.int16 and stored.min() >= 0  # the HU really went through the rescale
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for file, new in zip(files, np.random.default_rng(2).permutation(len(files))):
        shutil.copy(file, shuffled / f"IM{new:05d}")  # scanner-style names without extension
    back = read_volume(shuffled)
    np.testing.assert_array_equal(_in_grid_of(volume, back), volume.array)
    assert back.modality == "CT"
    assert read_volume(shuffled / "IM00003").shape == SHAPE  # one file opens its whole series


def test_dicom_integer_ct_stays_integer_hu(tmp_path):
    volume = _phantom(np.eye(4), dtype=np.int16)
    write_dicom_series(volume, tmp_path)
    back = read_volume(tmp_path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)


def test_dicom_mixed_series_lists_their_uids(tmp_path):
    first = write_dicom_series(_phantom(np.eye(4)), tmp_path / "a")
    second = write_dicom_series(_phantom(np.eye(4)), tmp_path / "b")
    mixed = tmp_path / "mixed_folder"
    mixed.mkdir()
    for file in first + second:
        shutil.copy(file, mixed / f"{file.parent.name}_{file.name}")
    uids = [str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in (first, second)]
    with pytest.raises(VolumeError, match="mixed_folder mixes 2 DICOM series") as error:
        read_volume(mixed)
    assert all(uid in str(error.value) for uid in uids)
    assert read_volume(mixed / "b_slice0000.dcm").shape == SHAPE  # a file picks its series


def test_dicom_frames_at_each_position_form_a_4d_series(tmp_path):
    base = _phantom(np.eye(4))
    first = write_dicom_series(base, tmp_path / "t0")
    later = write_dicom_series(Volume(base.array + 100, base.affine), tmp_path / "t1")
    uid = pydicom.dcmread(first[0]).SeriesInstanceUID
    for file in later:  # the second time point joins the first series
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.InstanceNumber = uid, ds.InstanceNumber + 1000
        ds.save_as(tmp_path / "t0" / f"late_{file.name}")
    with pytest.raises(VolumeError, match=r"t0 is a 4D series of 2 volumes"):
        read_volume(tmp_path / "t0")
    np.testing.assert_allclose(read_volume(tmp_path / "t0", frame=1).array, base.array + 100, atol=0.05)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BraTS_0001_t1c.nii.gz", ("MR", "T1C")),
        ("sub-01_ce-gd_T1w.nii.gz", ("MR", "T1C")),
        ("t1_post.nrrd", ("MR", "T1C")),
        ("T1_pre_contrast.nii", ("MR", "T1")),
        ("brain_flair.nii.gz", ("MR", "FLAIR")),
        ("case3_t2.nii", ("MR", "T2")),
        ("stroke_dwi.nii.gz", ("MR", "DWI")),
        ("stroke_adc.nii.gz", ("MR", "ADC")),
        ("chest_ct.nii.gz", ("CT", None)),
        ("patient7.nii.gz", ("unknown", None)),
    ],
)
def test_guess_from_file_name(name, expected):
    assert guess_modality({}, name) == expected


def test_guess_from_a_volume_uses_its_source_and_metadata():
    volume = Volume(np.zeros(SHAPE), np.eye(4), source="/data/case9/AX_FLAIR.nii.gz")
    assert guess_modality(volume) == ("MR", "FLAIR")
    volume.metadata["Modality"] = "CT"
    assert guess_modality(volume) == ("CT", None)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"Modality": "MR", "SeriesDescription": "AX T2 FLAIR"}, ("MR", "FLAIR")),
        ({"Modality": "MR", "SeriesDescription": "T1 MPRAGE", "ContrastBolusAgent": "Gadovist"}, ("MR", "T1C")),
        ({"Modality": "MR", "SeriesDescription": "ax 3d", "RepetitionTime": "9000", "EchoTime": "90",
          "InversionTime": "2500"}, ("MR", "FLAIR")),
        ({"Modality": "MR", "RepetitionTime": "500", "EchoTime": "12"}, ("MR", "T1")),
        ({"Modality": "MR", "DiffusionBValue": "1000"}, ("MR", "DWI")),
        ({"Modality": "CT", "SeriesDescription": "T1 level"}, ("CT", None)),
        ({"Modality": "PT"}, ("unknown", None)),
    ],
)
def test_guess_from_dicom_tags(tags, expected):
    assert guess_modality(tags, "IM0001") == expected


def test_written_modality_is_read_back_and_explicit_arguments_win(tmp_path):
    path = write_volume(Volume(_phantom(np.eye(4)).array, np.eye(4), "MR", "T1C"), tmp_path / "anonymous.nii.gz")
    assert (read_volume(path).modality, read_volume(path).sequence) == ("MR", "T1C")
    assert read_volume(path, sequence="flair").sequence == "FLAIR"
    assert (read_volume(path, modality="CT").modality, read_volume(path, modality="CT").sequence) == ("CT", None)


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def test_missing_and_unknown_files_are_named(tmp_path):
    with pytest.raises(VolumeError, match=r"nothing_here\.nii\.gz does not exist"):
        read_volume(tmp_path / "nothing_here.nii.gz")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(VolumeError, match=r"photo\.png is not in a supported format; use NIfTI .*NRRD .*DICOM"):
        read_volume(tmp_path / "photo.png")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VolumeError, match="empty_dir contains no DICOM image files"):
        read_volume(tmp_path / "empty_dir")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd"])
def test_truncated_files_are_reported_not_raised_raw(tmp_path, suffix):
    whole = write_volume(_phantom(np.eye(4)), tmp_path / f"whole{suffix}").read_bytes()
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(whole[: len(whole) // 2])
    pattern = rf"broken{suffix.replace('.', '[.]')} cannot be read: it is truncated or corrupt"
    with pytest.raises(VolumeError, match=pattern):
        read_volume(broken)


def test_garbage_with_a_known_extension_is_corrupt(tmp_path):
    for name in ("noise.nii.gz", "noise.nrrd", "noise.dcm"):
        (tmp_path / name).write_bytes(np.random.default_rng(3).bytes(600))
        with pytest.raises(VolumeError, match=rf"{name.replace('.', '[.]')} .*(truncated or corrupt)"):
            read_volume(tmp_path / name)


def test_truncated_dicom_slice_is_named(tmp_path):
    files = write_dicom_series(_phantom(np.eye(4)), tmp_path / "series")
    files[4].write_bytes(files[4].read_bytes()[:-300])
    with pytest.raises(VolumeError, match=r"slice0004\.dcm cannot be read: it has truncated"):
        read_volume(tmp_path / "series")


def test_size_is_refused_from_the_header_before_loading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii"
    with path.open("wb") as handle:  # a header that promises 29.8 GiB, with no voxels behind it
        handle.write(header.binaryblock + b"\0" * 4)
    with pytest.raises(VolumeError, match=r"huge\.nii would need 29\.8 GiB .*4\.0 GiB limit"):
        read_volume(path)
    small = write_volume(_phantom(np.eye(4)), tmp_path / "small.nrrd")
    with pytest.raises(VolumeError, match=r"small\.nrrd would need 0\.0 GiB"):
        read_volume(small, max_bytes=1000)
    write_dicom_series(_phantom(np.eye(4)), tmp_path / "dicom_series")
    with pytest.raises(VolumeError, match="dicom_series would need"):
        read_volume(tmp_path / "dicom_series", max_bytes=1000)


def test_unusable_contents_are_refused_with_the_file_name(tmp_path):
    nan = _phantom(np.eye(4)).array
    nan[:2, 0, 0] = np.nan
    cases = {
        "slice.nii.gz": (np.ones((32, 32, 1)), "is a 2D image \\(32 x 32\\); a 3D volume is needed"),
        "flat.nii.gz": (np.full(SHAPE, 7.0), "is constant"),
        "holes.nii.gz": (nan, "has 2 NaN or infinite voxels"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(VolumeError, match=rf"{name.replace('.', '[.]')} {message}"):
            read_volume(_nifti(tmp_path / name, data))
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code="scanner")  # j axis of length 0
    nib.save(nib.Nifti1Image(_phantom(np.eye(4)).array, None, header), tmp_path / "squashed.nii.gz")
    with pytest.raises(VolumeError, match=r"squashed\.nii\.gz has an impossible voxel size"):
        read_volume(tmp_path / "squashed.nii.gz")
    with pytest.raises(VolumeError, match=r"squashed\.nii\.gz has an impossible voxel size"):
        write_volume(Volume(nan, np.diag([1.0, 0.0, 1.0, 1.0]), source="squashed.nii.gz"), tmp_path / "out.nrrd")


def test_gzip_of_the_wrong_thing_is_corrupt(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"not an image at all" * 30))
    with pytest.raises(VolumeError, match=r"text\.nii\.gz cannot be read"):
        read_volume(path)


def test_volume_helpers_report_geometry_and_convert():
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    volume = Volume.from_numpy(voxels, spacing=(0.5, 1.0, 2.0), origin=(1, 2, 3))
    np.testing.assert_allclose(volume.affine, [[0.5, 0, 0, 1], [0, 1, 0, 2], [0, 0, 2, 3], [0, 0, 0, 1]])
    assert volume.orientation == "RAS" and _phantom(AFFINES["LPS"]).orientation == "LPS"
    tensor = volume.to_torch()
    assert tensor.dtype.is_floating_point and tuple(tensor.shape) == (2, 3, 4) and float(tensor[1, 2, 3]) == 23.0
