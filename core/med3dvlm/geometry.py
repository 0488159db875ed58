"""Where the model's input lies on the scan, read from the record of how it was made.

Every step of preprocessing maps voxel index coordinates axis by axis: reorientation permutes and
flips axes, the crop box shifts, a trilinear resize with ``align_corners=False`` scales voxel
edges onto voxel edges (x_box = (x_model + 0.5) * size / n - 0.5), a centred crop or pad shifts,
and a region crop shifts again. Their composition is one 4 x 4 matrix from model indices
(d, h, w) to the volume's stored indices (i, j, k); ``volume.affine @ matrix`` places the model's
input in world space, and maps on the model's grid are carried back along it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .preprocess import model_axes
from .volume import Volume


def model_to_voxel(volume: Volume, record: dict) -> np.ndarray:
    """4 x 4: model voxel index (d, h, w, 1) -> stored voxel index (i, j, k, 1) of ``volume``.

    ``record`` is ``model_input.prepare_input``'s (or ``preprocess.applied``'s) for ``volume``.
    """
    sources, flips = model_axes(volume, record["orientation"])
    shape = record["reoriented_shape"]
    region = record.get("region")
    offset = [v[0] for v in region["voxels"]] if region else [0, 0, 0]
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for m, axis in enumerate(sources):
        start, stop = record["crop_box"][m] if record["crop_box"] else (0, shape[m])
        size, n = stop - start, record["output_shape"][m]
        resized, shift = n, 0  # the resize's output size, and where the model grid starts in it
        if record["resize"] == "crop_pad":
            target = record["spacing"]
            resized = size if target is None else max(1, round(size * volume.spacing[axis] / target[m]))
            shift = (resized - n) // 2 if resized > n else -((n - resized) // 2)
        scale = size / resized
        position = (shift + 0.5) * scale - 0.5 + start  # of model index 0 on the reoriented grid
        if flips[m]:  # the reoriented axis runs backwards along the stored one
            scale, position = -scale, shape[m] - 1 - position
        matrix[axis, m], matrix[axis, 3] = scale, position + offset[axis]
    return matrix


def seen_voxels(volume: Volume, record: dict) -> list[list[int]]:
    """[start, stop) along i, j, k of the stored voxels that reached the model's input: the crop box
    (within the region) and, after a centred crop, only what it kept."""
    matrix = model_to_voxel(volume, record)
    sources, flips = model_axes(volume, record["orientation"])
    shape = record["reoriented_shape"]
    region = record.get("region")
    spans = [[0, 0]] * 3
    for m, axis in enumerate(sources):
        start, stop = record["crop_box"][m] if record["crop_box"] else (0, shape[m])
        if flips[m]:
            start, stop = shape[m] - stop, shape[m] - start
        offset = region["voxels"][axis][0] if region else 0
        ends = sorted(matrix[axis, m] * x + matrix[axis, 3] for x in (-0.5, record["output_shape"][m] - 0.5))
        first, last = math.ceil(ends[0] - 1e-9), math.floor(ends[1] + 1e-9)  # centres inside the model grid
        spans[axis] = [max(start + offset, first), min(stop + offset, last + 1)]
    return spans


def box_ras(volume: Volume, spans: list[list[int]]) -> tuple[list[float], list[float]]:
    """Two opposite corners, in RAS mm, of the box that the voxels ``spans`` fill (voxel edges)."""
    low = volume.affine @ np.array([s[0] - 0.5 for s in spans] + [1.0])
    high = volume.affine @ np.array([s[1] - 0.5 for s in spans] + [1.0])
    return low[:3].tolist(), high[:3].tolist()


def to_volume_grid(model_map: torch.Tensor | np.ndarray, volume: Volume, record: dict) -> np.ndarray:
    """A map on the model's grid (D, H, W) carried back onto ``volume``'s grid (float32, its shape).

    Each stored voxel that reached the model takes the map's value at its position on the model's
    grid (linear interpolation), divided by the number of its voxels that one model voxel spans, so
    that sums carry over (an attribution's total stays the same); voxels the model never saw get 0.
    """
    matrix = model_to_voxel(volume, record)
    spans = seen_voxels(volume, record)
    values = torch.as_tensor(np.asarray(model_map, dtype=np.float32))
    sources, _ = model_axes(volume, record["orientation"])
    for m, axis in enumerate(sources):
        start, stop = spans[axis]
        position = (torch.arange(start, stop, dtype=torch.float64) - matrix[axis, 3]) / matrix[axis, m]
        position = position.clamp(0, values.shape[m] - 1)  # the half voxel at each edge takes the edge's value
        low = position.floor().long().clamp(max=values.shape[m] - 2) if values.shape[m] > 1 else position.long()
        weight = (position - low).to(torch.float32).view([-1 if d == m else 1 for d in range(3)])
        high = (low + 1).clamp(max=values.shape[m] - 1)
        below, above = values.index_select(m, low), values.index_select(m, high)
        values = below + (above - below) * weight
    values = values.permute([sources.index(a) for a in range(3)])  # model axes -> stored axes
    out = np.zeros(volume.shape[:3], dtype=np.float32)
    if all(b > a for a, b in spans):
        out[tuple(slice(a, b) for a, b in spans)] = values.numpy() / abs(np.linalg.det(matrix[:3, :3]))
    return out
