"""The `Volume` type: a 3D voxel grid with its voxel-to-RAS affine, modality and metadata.

Conventions (same as nibabel / NIfTI):
- ``array`` is indexed ``array[i, j, k]``; the affine maps (i, j, k, 1) to RAS millimetres.
- ``modality`` is "CT", "MR" or "unknown"; ``sequence`` is the MRI sequence when known
  (one of ``MR_SEQUENCES``), else None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from nibabel.orientations import aff2axcodes

if TYPE_CHECKING:
    import torch

MODALITIES = ("CT", "MR", "unknown")
MR_SEQUENCES = ("T1", "T2", "FLAIR", "DWI", "ADC", "T1C")


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"
    sequence: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.sequence is not None and self.sequence not in MR_SEQUENCES:
            raise ValueError(f"sequence must be one of {MR_SEQUENCES}, got {self.sequence!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def name(self) -> str:
        return self.source or "<in-memory volume>"

    @property
    def orientation(self) -> str:
        """Axis codes of i, j, k, e.g. "RAS" or "LPS" (the direction each index increases)."""
        return "".join(aff2axcodes(self.affine))

    @classmethod
    def from_numpy(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        **fields: Any,
    ) -> Volume:
        """An axis-aligned RAS volume; ``fields`` are the other dataclass fields (modality...)."""
        affine = np.diag([*map(float, spacing), 1.0])
        affine[:3, 3] = origin
        return cls(np.asarray(array), affine, **fields)

    def to_torch(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The voxels as a tensor indexed [i, j, k] (float32 unless ``dtype`` says otherwise)."""
        import torch  # imported here so that reading volumes does not pay for importing torch

        tensor = torch.from_numpy(np.ascontiguousarray(self.array))
        return tensor.to(device=device, dtype=dtype or torch.float32)
