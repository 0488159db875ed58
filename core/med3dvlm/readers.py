"""Reading NIfTI, NRRD and DICOM series into a RAS `Volume`, and writing NIfTI, NRRD and DICOM.

`read_volume` checks the header (shape, frames, memory) before loading voxels, turns library
exceptions into a one-sentence `VolumeError` naming the file, and returns a validated volume.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from .errors import VolumeError
from .modality import guess_modality
from .validation import check_affine, check_memory, check_shape, squeeze_shape, validate_volume
from .volume import Volume

SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or a DICOM series folder (or one file of it)"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: also RAS -> LPS


# ----------------------------------------------------------------------------- reading
def file_version(path) -> tuple | None:
    """(path, size, mtime) of a volume file, to recognise it when asked about again without reading
    it; None for a DICOM folder (read each time) or a path that cannot be read (read_volume says why)."""
    try:
        path = Path(path).expanduser().resolve()
        stat = path.stat()
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns) if path.is_file() else None


def read_volume(
    path: str | Path,
    *,
    modality: str | None = None,
    sequence: str | None = None,
    max_bytes: int | None = None,
    frame: int | None = None,
) -> Volume:
    """Reads a 3D volume (``frame`` picks one volume of a 4D series); explicit modality/sequence win."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise VolumeError(f"{name} does not exist.")
    reader = {"nifti": _read_nifti, "nrrd": _read_nrrd, "dicom": _read_dicom}[_format_of(path, name)]
    with _reading(name):  # also covers malformed header values met while reading the geometry
        array, affine, metadata = reader(path, name, frame, max_bytes)
    modality, sequence = _choose(modality, sequence, guess_modality(metadata, path.name))
    return validate_volume(Volume(array, affine, modality, sequence, metadata, name))


def as_volume(volume) -> Volume:
    """A Volume as it is, an ``(array, affine)`` pair as a Volume, a path read (``read_volume``)."""
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, tuple):
        array, affine = volume
        return Volume(np.asarray(array), np.asarray(affine))
    return read_volume(volume)


@contextmanager
def _reading(name: str, problem: str = "is truncated or corrupt") -> Iterator[None]:
    """Turns whatever a library raises on bad bytes into one sentence naming the file."""
    try:
        yield
    except VolumeError:
        raise
    except MemoryError as exc:
        raise VolumeError(f"{name} does not fit in memory; crop or downsample it first.") from exc
    except PermissionError as exc:
        raise VolumeError(f"{name} cannot be opened: permission denied.") from exc
    except FileNotFoundError as exc:  # e.g. the data file named by a detached .nhdr header
        raise VolumeError(f"{name} cannot be read: the file {exc.filename} it needs is missing.") from exc
    except Exception as exc:  # nibabel, pynrrd, pydicom, gzip and zlib each raise their own types
        reason = " ".join(str(exc).split())  # library messages may span lines
        raise VolumeError(f"{name} cannot be read: it {problem} ({type(exc).__name__}: {reason}).") from exc


def _format_of(path: Path, name: str) -> str:
    lower = path.name.lower()
    if path.is_dir() or lower.endswith((".dcm", ".ima")):
        return "dicom"
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if lower.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    with _reading(name):
        with path.open("rb") as handle:
            if handle.read(132)[128:] == b"DICM":  # DICOM files often have no extension
                return "dicom"
    raise VolumeError(f"{name} is not in a supported format; use {SUPPORTED}.")


def _rescale(raw: np.ndarray, slope: Any, intercept: Any) -> np.ndarray:
    """Applies stored-to-real scaling, staying integer when the scaling is integral (CT in HU)."""
    slope, intercept = np.asarray(slope, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
    if np.all(slope == 1) and np.all(intercept == 0):
        return raw
    integral = np.all(slope == np.round(slope)) and np.all(intercept == np.round(intercept))
    if raw.dtype.kind in "iu" and integral:
        work = np.int32 if raw.dtype.itemsize <= 2 else np.int64
        out = raw.astype(work) * slope.astype(work) + intercept.astype(work)
        return out.astype(np.int16) if -32768 <= out.min() and out.max() <= 32767 else out
    real = np.result_type(raw.dtype, np.float32)
    return raw.astype(real) * slope.astype(real) + intercept.astype(real)


def _scaled_itemsize(itemsize: int, slope: Any, intercept: Any) -> int:
    identity = np.all(np.asarray(slope) == 1) and np.all(np.asarray(intercept) == 0)
    return itemsize if identity else max(itemsize, 4)


def _read_nifti(path: Path, name: str, frame: int | None, max_bytes: int | None):
    image = nib.load(str(path))
    proxy, header = image.dataobj, image.header
    slope, intercept = float(proxy.slope), float(proxy.inter)
    description = header["descrip"].tobytes().split(b"\0")[0].decode("latin-1").strip()
    shape = squeeze_shape(image.shape)
    check_shape(name, shape, frame)
    itemsize = _scaled_itemsize(header.get_data_dtype().itemsize, slope, intercept)
    check_memory(name, shape[:3], itemsize, max_bytes)
    raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)  # memory-mapped for .nii files
    raw = raw[..., frame] if len(shape) == 4 else raw
    if isinstance(raw, np.memmap) or len(shape) == 4:
        raw = np.array(raw)  # own the voxels: neither tied to the file nor to the other frames
    metadata = {"format": "NIfTI", "description": description, "frames": shape[3] if len(shape) == 4 else 1}
    return _rescale(raw, slope, intercept), image.affine, metadata


# NRRD names its world space; unknown spaces ("scanner-xyz", "3D-right-handed") are read as
# LPS, as ITK and Slicer do.
_NRRD_SPACES = {
    "right-anterior-superior": "RAS", "left-posterior-superior": "LPS", "left-anterior-superior": "LAS",
    "ras": "RAS", "lps": "LPS", "las": "LAS",
}
_NRRD_SPATIAL_KINDS = ("domain", "space")


def _nrrd_itemsize(type_name: str) -> int:
    name = type_name.lower()
    if "char" in name or "int8" in name:
        return 1
    if "short" in name or "int16" in name:
        return 2
    if "long" in name or "int64" in name or "double" in name:
        return 8
    return 4  # int, uint, int32, float


def _nrrd_spatial_axes(header: Mapping[str, Any]) -> list[int]:
    count = int(header["dimension"])
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        return [a for a in range(count) if np.all(np.isfinite(directions[a]))]
    kinds = header.get("kinds")
    if kinds:
        return [a for a in range(count) if str(kinds[a]).lower() in _NRRD_SPATIAL_KINDS]
    return list(range(count))


def _nrrd_affine(header: Mapping[str, Any], axes: Sequence[int]) -> np.ndarray:
    space = str(header.get("space", "LPS")).lower().removesuffix("-time")
    code = _NRRD_SPACES.get(space, "LPS")
    affine = np.eye(4)
    if "space directions" in header:
        affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64)[list(axes), :3].T
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * int(header["dimension"])), dtype=np.float64)
        affine[:3, :3] = np.diag(np.where(np.isfinite(spacings[list(axes)]), spacings[list(axes)], 1.0))
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)[:3]
    return np.diag([1.0 if letter in "RAS" else -1.0 for letter in code] + [1.0]) @ affine


def _read_nrrd(path: Path, name: str, frame: int | None, max_bytes: int | None):
    header = nrrd.read_header(str(path))
    sizes = [int(s) for s in header["sizes"]]
    spatial = _nrrd_spatial_axes(header)
    if len(spatial) < 3:
        check_shape(name, [sizes[a] for a in spatial])  # raises: fewer than 3 spatial axes is 2D
    order = spatial + [a for a in range(len(sizes)) if a not in spatial]
    shape = squeeze_shape([sizes[a] for a in order])
    check_shape(name, shape, frame)
    check_memory(name, shape[:3], _nrrd_itemsize(str(header["type"])), max_bytes)
    data, header = nrrd.read(str(path))
    data = np.transpose(data, order).reshape(shape)
    affine = _nrrd_affine(header, order[:3])
    if len(shape) == 4:
        data = data[..., frame].copy()
    metadata = {key: value for key, value in header.items() if isinstance(value, str)}
    frames = shape[3] if len(shape) == 4 else 1
    metadata.update(format="NRRD", description=header.get("content", ""), frames=frames)
    return data, affine, metadata


_DICOM_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_DICOM_KEPT = (
    "Modality", "SeriesDescription", "ProtocolName", "SequenceName", "ScanningSequence", "ContrastBolusAgent",
    "RepetitionTime", "EchoTime", "InversionTime", "DiffusionBValue", "BodyPartExamined", "SeriesInstanceUID",
)


def _dicom_header(file: Path) -> Dataset | None:
    """The header of an image file, or None for files that are not DICOM images (DICOMDIR, notes)."""
    with _reading(str(file)):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except InvalidDicomError:
            return None
    return ds if "Rows" in ds and "SeriesInstanceUID" in ds else None


def _tag_text(value: Any) -> str:
    multiple = isinstance(value, (list, pydicom.multival.MultiValue))
    return "\\".join(map(str, value)) if multiple else str(value)


def _read_dicom(path: Path, name: str, frame: int | None, max_bytes: int | None):
    folder = path if path.is_dir() else path.parent
    wanted = None
    if not path.is_dir():
        own = _dicom_header(path)
        if own is None:
            raise VolumeError(f"{name} is not a DICOM image file (it may be truncated or corrupt).")
        wanted = own.SeriesInstanceUID
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    headers = [(file, ds) for file in files if (ds := _dicom_header(file)) is not None]
    if wanted is not None:
        headers = [(file, ds) for file, ds in headers if ds.SeriesInstanceUID == wanted]
    if not headers:
        raise VolumeError(f"{name} contains no DICOM image files; use {SUPPORTED}.")
    series = sorted({str(ds.SeriesInstanceUID) for _, ds in headers})
    if len(series) > 1:
        raise VolumeError(
            f"{name} mixes {len(series)} DICOM series (SeriesInstanceUID {', '.join(series)}); "
            f"put each series in its own folder or open one file of the series you want."
        )
    files, datasets = [f for f, _ in headers], [ds for _, ds in headers]
    first = datasets[0]
    missing = [tag for tag in _DICOM_GEOMETRY if tag not in first]
    if missing:
        raise VolumeError(f"{name} lacks the DICOM tags {', '.join(missing)}, so its 3D geometry is unknown.")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(
            f"{name} is an enhanced multi-frame DICOM, which is not supported; "
            f"convert it to NIfTI (e.g. with dcm2niix)."
        )
    if len({(int(ds.Rows), int(ds.Columns)) for ds in datasets}) > 1:
        raise VolumeError(f"{name} mixes images of different sizes; it is not one 3D series.")

    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise VolumeError(f"{name} mixes slices with different orientations; it is not one 3D series.")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    depth = np.round(positions @ normal, 3)  # slices within a micron share a position
    levels, counts = np.unique(depth, return_counts=True)
    if counts.min() != counts.max():
        raise VolumeError(
            f"{name} has a different number of images at different slice positions; "
            f"slices are missing or duplicated."
        )
    frames = int(counts[0])
    shape = (int(first.Columns), int(first.Rows), len(levels)) + ((frames,) if frames > 1 else ())
    check_shape(name, shape, frame)
    steps = np.diff(levels)
    if steps.size and steps.max() - steps.min() > max(1e-3, 0.05 * steps.mean()):
        raise VolumeError(
            f"{name} has uneven slice spacing ({steps.min():g} to {steps.max():g} mm); slices are probably missing."
        )

    instance = np.array([int(ds.get("InstanceNumber", 0) or 0) for ds in datasets])
    chosen = np.lexsort((instance, depth)).reshape(len(levels), frames)[:, frame or 0]
    slopes = np.array([float(datasets[i].get("RescaleSlope", 1) or 1) for i in chosen])
    intercepts = np.array([float(datasets[i].get("RescaleIntercept", 0) or 0) for i in chosen])
    itemsize = _scaled_itemsize(int(first.BitsAllocated) // 8, slopes, intercepts)
    check_memory(name, shape[:3], itemsize, max_bytes)
    slices = []
    for i in chosen:
        with _reading(str(files[i]), "has truncated, corrupt or undecodable (compressed) pixel data"):
            slices.append(pydicom.dcmread(files[i]).pixel_array.T)  # [row, col] -> [i, j]
    array = _rescale(np.stack(slices, axis=-1), slopes, intercepts)

    spacing = [float(v) for v in first.PixelSpacing]  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 3] = row * spacing[1], col * spacing[0], positions[chosen[0]]
    if len(chosen) > 1:  # the real step between slices, which also keeps a gantry tilt
        lps[:3, 2] = (positions[chosen[-1]] - positions[chosen[0]]) / (len(chosen) - 1)
    else:
        thickness = first.get("SpacingBetweenSlices", None) or first.get("SliceThickness", None) or 1.0
        lps[:3, 2] = normal * float(thickness)
    metadata = {tag: _tag_text(first.get(tag)) for tag in _DICOM_KEPT if first.get(tag) not in (None, "")}
    metadata.update(format="DICOM", files=len(files), frames=frames)
    return array, LPS_TO_RAS @ lps, metadata


def _choose(
    modality: str | None, sequence: str | None, guessed: tuple[str, str | None]
) -> tuple[str, str | None]:
    """Explicit arguments win over the guess; a sequence implies MR."""
    sequence = sequence.upper() if sequence else None
    if modality:
        modality = {"MRI": "MR", "UNKNOWN": "unknown"}.get(modality.upper(), modality.upper())
    else:
        modality = "MR" if sequence else guessed[0]
    if sequence is None and modality == "MR":
        sequence = guessed[1]
    return modality, sequence


# ----------------------------------------------------------------------------- writing
def _description(volume: Volume) -> str:
    """"MR T1C"-style text that `guess_modality` reads back from the file."""
    return " ".join(part for part in (volume.modality, volume.sequence) if part and part != "unknown")


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Writes NIfTI (.nii, .nii.gz; sform and qform = the affine) or NRRD (.nrrd, .nhdr; LPS space)."""
    check_affine(volume.name, volume.affine)
    path = Path(path)
    lower = path.name.lower()
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    if lower.endswith((".nii", ".nii.gz")):
        dtype = "compat" if array.dtype.itemsize == 8 and array.dtype.kind in "iu" else None
        image = nib.Nifti1Image(array, volume.affine, dtype=dtype)
        image.header.set_sform(volume.affine, code="scanner")
        image.header.set_qform(volume.affine, code="scanner")
        image.header["descrip"] = _description(volume).encode()
        nib.save(image, str(path))
    elif lower.endswith((".nrrd", ".nhdr")):
        lps = LPS_TO_RAS @ volume.affine
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,  # one row per axis
            "space origin": lps[:3, 3],
            "kinds": ["domain"] * array.ndim,
            "encoding": "gzip",
            "content": _description(volume) or "volume",
        }
        nrrd.write(str(path), np.asarray(array), header)
    else:
        raise VolumeError(f"{path} cannot be written: use a .nii, .nii.gz, .nrrd or .nhdr file name.")
    return path


_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
# A conformant Part 10 file (preamble, file meta): pydicom 3 names it enforce_file_format; 2.4,
# which Slicer 5.10 bundles, write_like_original=False (deprecated in 3, so not passed there).
_CONFORMANT_FILE = ({"enforce_file_format": True} if int(pydicom.__version__.split(".")[0]) >= 3
                    else {"write_like_original": False})


def _ds(values: Any) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in np.ravel(values)]


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    slope: float | None = None,
    intercept: float | None = None,
) -> list[Path]:
    """Writes one int16 DICOM file per k-slice (CT, or MR for MR volumes) with RescaleSlope/Intercept.

    Without ``slope``/``intercept``, integer volumes are stored as value + 1024 (slope 1, intercept
    -1024, as CT scanners do) and other volumes are scaled to fill the int16 range.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = np.asarray(volume.array, dtype=np.float64)
    if slope is None or intercept is None:
        low, high = float(values.min()), float(values.max())
        if np.all(values == np.round(values)) and low + 1024 >= -32768 and high + 1024 <= 32767:
            slope, intercept = 1.0, -1024.0
        else:
            slope, intercept = max(high - low, 1e-6) / 65534.0, (high + low) / 2.0
    stored = np.clip(np.rint((values - intercept) / slope), -32768, 32767).astype(np.int16)

    lps = LPS_TO_RAS @ volume.affine
    spacing_i, spacing_j = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / spacing_i, lps[:3, 1] / spacing_j
    if abs(row @ col) > 1e-6:
        raise VolumeError(f"{volume.name} cannot be written as DICOM: its i and j axes are not at right angles.")
    modality = "MR" if volume.modality == "MR" else "CT"

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (generate_uid() for _ in range(3))
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber = "Phantom", "PHANTOM", modality, 1
    ds.SeriesDescription = volume.sequence or modality
    ds.ImageOrientationPatient = _ds([row, col])
    ds.PixelSpacing = _ds([spacing_j, spacing_i])  # (between rows, between columns)
    ds.SliceThickness = DSfloat(float(np.linalg.norm(lps[:3, 2])), auto_format=True)
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds([slope])[0], _ds([intercept])[0]
    if modality == "CT":
        ds.RescaleType = "HU"
    paths = []
    for k in range(stored.shape[2]):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(lps[:3, 3] + k * lps[:3, 2])
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        paths.append(folder / f"slice{k:04d}.dcm")
        ds.save_as(paths[-1], **_CONFORMANT_FILE)
    return paths
