"""A human-readable summary of a volume, for `med3dvlm info` and logs."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from .volume import Volume


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes such as 'RAS' or 'LPS': the direction each voxel axis i, j, k points to."""
    return "".join(nib.orientations.aff2axcodes(affine))


def is_oblique(affine: np.ndarray, tolerance: float = 1e-3) -> bool:
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.any((np.abs(directions) > tolerance) & (np.abs(directions) < 1 - tolerance)))


def volume_summary(volume: Volume) -> str:
    array = volume.array
    spacing = " x ".join(f"{s:.3g}" for s in volume.spacing)
    extent = " x ".join(f"{n * s:.0f}" for n, s in zip(array.shape, volume.spacing))
    modality = volume.modality + (f" ({volume.sequence})" if volume.sequence else "")
    lines = [
        f"{volume.name}",
        f"  shape:        {' x '.join(map(str, array.shape))} voxels ({array.dtype})",
        f"  spacing:      {spacing} mm (field of view {extent} mm)",
        f"  orientation:  {orientation_code(volume.affine)}{' (oblique)' if is_oblique(volume.affine) else ''}",
        f"  origin (RAS): {', '.join(f'{x:.1f}' for x in volume.affine[:3, 3])} mm",
        f"  intensities:  min {float(array.min()):.4g}, max {float(array.max()):.4g}, "
        f"mean {float(array.mean()):.4g}",
        f"  modality:     {modality}",
    ]
    return "\n".join(lines)
