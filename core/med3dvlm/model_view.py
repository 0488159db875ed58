"""The model's view of a volume: exactly what the model received (after region crop, reorientation,
window, crop and resize) as a volume placed over the scan, and the box of the scan it covers."""

from __future__ import annotations

from collections.abc import Sequence

from .explained import ModelView
from .geometry import box_ras, model_to_voxel, seen_voxels
from .model_input import prepare_input
from .preprocess import PreprocessConfig
from .region import Region
from .volume import Volume


def model_view(volume: Volume, config: PreprocessConfig, region: Region | None = None,
               window: Sequence[float] | None = None) -> ModelView:
    """What a model with preprocessing ``config`` receives from ``volume`` (see ``ModelView``)."""
    pixels, record = prepare_input(volume, config, region, window)
    affine = volume.affine @ model_to_voxel(volume, record)
    placed = Volume(pixels[0].float().numpy(), affine, modality=volume.modality, sequence=volume.sequence,
                    source=f"model view of {volume.name}")
    spans = seen_voxels(volume, record)
    return ModelView(placed, box_ras(volume, spans), spans, record)
