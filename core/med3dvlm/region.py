"""A region of interest: a box in RAS millimetres -> the part of a volume the model is shown.

The box is given by two opposite corners. The volume is cropped to the voxels whose centres lie in
the box or within ``MARGIN_MM`` of it (context, so that a finding at the box's edge is not cut in
half) before the usual preprocessing, so that the model sees the region at up to the scan's own
resolution. The crop is a view of the stored voxels, with an affine that keeps every voxel where it
was in world space.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from .errors import RegionError
from .preprocess import model_axes
from .volume import Volume

MARGIN_MM = 10.0
# A region may be magnified at most this much along an axis: beyond it the model would be shown
# interpolation between a few voxels, not anatomy.
MAX_ZOOM = 4
Region = tuple[Sequence[float], Sequence[float]]
_AXES = ("R-L", "A-P", "S-I")
_EPS = 1e-6  # index arithmetic slack: a voxel centre on the box's face counts as inside


def parse_region(region: Region) -> np.ndarray:
    """(2, 3) corners in RAS mm, or RegionError when they do not make a box."""
    try:
        corners = np.asarray(region, dtype=np.float64)
    except (TypeError, ValueError):
        corners = None
    if corners is None or corners.shape != (2, 3) or not np.isfinite(corners).all():
        raise RegionError(f"A region is two opposite corners (R, A, S) in millimetres, like "
                          f"((r0, a0, s0), (r1, a1, s1)); got {region!r}.")
    flat = [_AXES[a] for a in range(3) if corners[0, a] == corners[1, a]]
    if flat:
        raise RegionError(f"The region is empty: its two corners have the same {' and '.join(flat)} "
                          "coordinate, so it has no size there; draw a box with a size along all three axes.")
    return corners


def _index_bounds(volume: Volume, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box's bounds in continuous voxel indices (its 8 corners taken through the inverse affine)."""
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    points = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(volume.affine) @ points.T)[:3].T
    return ijk.min(axis=0), ijk.max(axis=0)


def _world_extent(volume: Volume) -> str:
    edges = np.array([[i, j, k, 1.0] for i in (-0.5, volume.shape[0] - 0.5) for j in (-0.5, volume.shape[1] - 0.5)
                      for k in (-0.5, volume.shape[2] - 0.5)])
    ras = (volume.affine @ edges.T)[:3]
    return ", ".join(f"{'RAS'[a]} {ras[a].min():.1f} to {ras[a].max():.1f}" for a in range(3))


def crop_to_region(volume: Volume, region: Region, input_shape: Sequence[int], orientation: str,
                   margin_mm: float = MARGIN_MM) -> tuple[Volume, dict]:
    """The volume cropped to ``region`` (+ margin) and the record of the crop (provenance).

    ``input_shape`` (D, H, W) and ``orientation`` are the model's (``PreprocessConfig``): a crop
    that would be magnified more than ``MAX_ZOOM`` times along a model axis is refused.
    Record: ``ras`` (the corners given), ``margin_mm``, ``voxels`` ([start, stop) along i, j, k of
    the volume) and ``shape``.
    """
    corners = parse_region(region)
    low, high = _index_bounds(volume, corners)
    shape = np.array(volume.shape[:3])
    if np.any(high < -0.5) or np.any(low > shape - 0.5):
        raise RegionError(f"The region ({box_text(corners)}) lies outside {volume.name}, which spans "
                          f"{_world_extent(volume)} mm.")
    margin = margin_mm / np.array(volume.spacing)
    start = np.maximum(0, np.ceil(low - margin - _EPS)).astype(int)
    stop = np.minimum(shape, np.floor(high + margin + _EPS).astype(int) + 1)
    _check_size(volume, stop - start, input_shape, orientation, margin_mm)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    shift = np.eye(4)
    shift[:3, 3] = start
    cropped = dataclasses.replace(volume, array=volume.array[box], affine=volume.affine @ shift)
    record = {"ras": corners.tolist(), "margin_mm": float(margin_mm),
              "voxels": [[int(a), int(b)] for a, b in zip(start, stop)], "shape": [int(n) for n in stop - start]}
    return cropped, record


def box_text(corners) -> str:
    """"R 0 to 5, A -3 to 2, S 10 to 40" for two corners in RAS mm."""
    corners = np.asarray(corners, dtype=np.float64)
    return ", ".join(f"{'RAS'[a]} {corners[:, a].min():g} to {corners[:, a].max():g}" for a in range(3))


def _check_size(volume: Volume, counts: np.ndarray, input_shape: Sequence[int], orientation: str,
                margin_mm: float) -> None:
    sources, _ = model_axes(volume, orientation)
    world = np.abs(volume.affine[:3, :3]).argmax(axis=0)  # the world axis each stored axis runs along
    short = []
    for m, axis in enumerate(sources):
        # An axis where the whole scan has fewer voxels than that is not held against the region.
        needed = min(math.ceil(input_shape[m] / MAX_ZOOM), volume.shape[axis])
        if counts[axis] < needed:
            size = volume.spacing[axis]
            short.append(f"along {_AXES[world[axis]]} it spans {counts[axis]} voxels ({counts[axis] * size:.1f} mm) "
                         f"and needs at least {needed} ({needed * size:.1f} mm)")
    if short:
        dims = " x ".join(str(int(n)) for n in input_shape)
        raise RegionError(f"The region is too small for the model's {dims} input, which may magnify it at most "
                          f"{MAX_ZOOM} times: with its {margin_mm:g} mm margin, {'; '.join(short)} in "
                          f"{volume.name}; draw a larger box.")
