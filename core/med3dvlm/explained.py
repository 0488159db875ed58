"""What explains an answer, as plain data: an evidence map with its answer, and the model's view of
a volume. No torch here: ``med3dvlm.connect`` builds these from a model server's answers.

``to_dict`` is everything but the voxels, as plain JSON (what the server sends beside the volume
it makes available for download); ``from_dict`` puts the downloaded volume back in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume


@dataclass
class Evidence:
    """``map``: relevance of each voxel of the volume to ``answer`` (float32, the volume's grid and
    affine; 0 where the model saw nothing); ``question``: what was asked (None for a report; the
    label for a score); ``method``: the attribution method; ``preprocessing``: what the model
    received (``model_input``'s record)."""

    map: Volume
    answer: str
    question: str | None
    method: str
    preprocessing: dict

    @property
    def peak_ras(self) -> list[float]:
        """RAS mm of the voxel that supports the answer most."""
        index = np.unravel_index(int(np.argmax(self.map.array)), self.map.shape)
        return (self.map.affine @ np.array([*index, 1.0]))[:3].tolist()

    def to_dict(self) -> dict:
        return {"answer": self.answer, "question": self.question, "method": self.method,
                "peak_ras": self.peak_ras, "shape": list(self.map.shape), "affine": self.map.affine.tolist(),
                "preprocessing": self.preprocessing}

    @classmethod
    def from_dict(cls, data: dict, map: Volume) -> Evidence:
        return cls(map, data["answer"], data["question"], data["method"], data["preprocessing"])


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
        return {"box_ras": [list(c) for c in self.box_ras], "box_voxels": self.box_voxels,
                "shape": list(self.volume.shape), "affine": self.volume.affine.tolist(),
                "preprocessing": self.preprocessing}

    @classmethod
    def from_dict(cls, data: dict, volume: Volume) -> ModelView:
        return cls(volume, tuple(data["box_ras"]), data["box_voxels"], data["preprocessing"])
