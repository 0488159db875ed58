"""The model's view of a volume: exactly what the model received (after region crop, reorientation,
window, crop and resize) as a volume placed over the scan, and the box of the scan it covers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .geometry import box_ras, model_to_voxel, seen_voxels
from .model_input import prepare_input
from .preprocess import PreprocessConfig
from .region import Region
from .volume import Volume


@dataclass
class ModelView:
    """``volume``: the model input, float32 in [0, 1] indexed (D, H, W), with an affine that lays
    it over the scan in world space; ``box_ras``: two opposite corners (RAS mm) of the box of the
    scan that reached the model (voxel edges: a Markups ROI from them covers exactly those voxels);
    ``box_voxels``: that box as [start, stop) along i, j, k of the scan; ``preprocessing``: the
    record of what was done (``model_input.prepare_input``)."""

    volume: Volume
    box_ras: tuple[list[float], list[float]]
    box_voxels: list[list[int]]
    preprocessing: dict

    def to_dict(self) -> dict:
        """Everything but the voxels, as plain JSON."""
        return {"box_ras": [list(c) for c in self.box_ras], "box_voxels": self.box_voxels,
                "shape": list(self.volume.shape), "affine": self.volume.affine.tolist(),
                "preprocessing": self.preprocessing}


def model_view(volume: Volume, config: PreprocessConfig, region: Region | None = None,
               window: Sequence[float] | None = None) -> ModelView:
    """What a model with preprocessing ``config`` receives from ``volume`` (see ``ModelView``)."""
    pixels, record = prepare_input(volume, config, region, window)
    affine = volume.affine @ model_to_voxel(volume, record)
    placed = Volume(pixels[0].float().numpy(), affine, modality=volume.modality, sequence=volume.sequence,
                    source=f"model view of {volume.name}")
    spans = seen_voxels(volume, record)
    return ModelView(placed, box_ras(volume, spans), spans, record)
