"""Checks that a volume is usable by the models, each failing with one sentence naming the file.

The header-level checks (`check_shape`, `check_memory`, `check_affine`) run in the readers
before any voxel is loaded, so that a 40 GiB file or a 4D series is refused at once;
`validate_volume` repeats the shape and affine checks and adds the ones that need the voxels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .errors import VolumeError
from .volume import Volume

DEFAULT_MAX_BYTES = 4 * 1024**3
GIB = 1024**3


def _dims(shape: Sequence[int]) -> str:
    return " x ".join(str(int(d)) for d in shape)


def squeeze_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Drops trailing size-1 axes beyond the third: (20, 24, 16, 1) is a 3D volume."""
    dims = [int(d) for d in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def check_shape(name: str, shape: Sequence[int], frame: int | None = None) -> None:
    """Refuses empty, 1D/2D and 5D+ images, and 4D series unless ``frame`` picks one volume."""
    dims = squeeze_shape(shape)
    if 0 in dims:
        raise VolumeError(f"{name} is empty ({_dims(dims)} = 0 voxels); a 3D volume is needed.")
    if len(dims) > 4:
        raise VolumeError(f"{name} has {len(dims)} dimensions ({_dims(dims)}); a 3D volume is needed.")
    frames = dims[3] if len(dims) == 4 else 1
    if len(dims) == 4 and frame is None:
        raise VolumeError(
            f"{name} is a 4D series of {frames} volumes ({_dims(dims)}); "
            f"pick one with `--frame N` (read_volume(..., frame=N)), N from 0 to {frames - 1}."
        )
    if frame is not None and not 0 <= frame < frames:
        raise VolumeError(
            f"{name} has {frames} volume{'s' if frames > 1 else ''}, so frame {frame} does not exist "
            f"(use 0 to {frames - 1})."
        )
    spatial = dims[:3]
    large = [d for d in spatial if d > 1]
    if len(spatial) < 3 or len(large) < 3:
        raise VolumeError(
            f"{name} is a {len(large)}D image ({_dims(large or spatial)}); a 3D volume is needed."
        )


def check_memory(name: str, shape: Sequence[int], itemsize: int, max_bytes: int | None = None) -> None:
    """Refuses a volume whose voxels would take more than ``max_bytes`` (default 4 GiB)."""
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    needed = float(np.prod([float(d) for d in shape])) * itemsize
    if needed > limit:
        raise VolumeError(
            f"{name} would need {needed / GIB:.1f} GiB of memory ({_dims(shape)} voxels of "
            f"{itemsize} bytes), more than the {limit / GIB:.1f} GiB limit; crop or downsample it, "
            f"or raise max_bytes."
        )


def check_affine(name: str, affine: np.ndarray) -> None:
    """Refuses non-finite affines, zero/negative voxel sizes and collapsed (singular) axes."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{name} has a NaN or infinite voxel-to-world transform; its header is broken.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * float(np.prod(spacing)):
        raise VolumeError(
            f"{name} has an impossible voxel size or axis layout (spacing "
            f"{', '.join(f'{s:g}' for s in spacing)} mm); its header is broken."
        )


def validate_volume(volume: Volume) -> Volume:
    """Returns ``volume`` (trailing size-1 axes dropped) or raises VolumeError saying what is wrong."""
    name, array = volume.name, volume.array
    if array.dtype.kind not in "biuf":
        raise VolumeError(f"{name} has {array.dtype} voxels; grey values (integers or floats) are needed.")
    check_shape(name, array.shape)
    if array.ndim > 3:
        array = array.reshape(array.shape[:3])
    check_affine(name, volume.affine)
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise VolumeError(
                f"{name} has {bad} NaN or infinite voxel{'s' if bad > 1 else ''} out of {array.size}; "
                f"fix or mask them before use."
            )
    low, high = array.min(), array.max()
    if low == high:
        raise VolumeError(f"{name} is constant (every voxel is {low}); it holds no image.")
    return volume if array is volume.array else dataclasses.replace(volume, array=array)
