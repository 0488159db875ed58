"""Synthetic CT and multi-sequence MRI phantoms of the abdomen / lower chest with ground truth.

``make_ct_phantom(seed)`` and ``make_mr_study(seed)`` draw the same anatomy and findings for
the same seed (separate random streams for anatomy, findings, geometry and rendering), so a
CT phantom and an MR study of one seed share their ``GroundTruth`` apart from modality.
Volumes are stored in a per-phantom layout (LPS, LAS, RAS or LPI index directions, like files
from different scanners and converters); the affine maps indices to RAS millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..volume import MR_SEQUENCES, Volume
from . import anatomy as A
from .lesions import ABNORMALITIES, ALLOWED, LOCATIONS, ORGANS, Finding, place_findings

__all__ = ["ABNORMALITIES", "ALLOWED", "CT_PHASES", "GENERATOR_VERSION", "LABELS", "LOCATIONS",
           "ORGANS", "ORIENTATIONS", "Finding", "GroundTruth", "MRStudy", "Phantom",
           "make_ct_phantom", "make_mr_study"]

GENERATOR_VERSION = "2.1"   # 2.1: texts state findings first, in reading order (volumes as 2.0)
LABELS = A.LABELS
ORIENTATIONS = ("LPS", "LAS", "RAS", "LPI")   # direction in which i, j, k increase
CT_PHASES = ("non-contrast", "portal venous")

# CT: tissue -> (HU non-contrast, HU portal venous, coarse texture SD, fine texture SD).
_CT = {
    A.AIR: (-1000, -1000, 0, 0), A.LUNG: (-860, -850, 25, 15), A.FAT: (-100, -100, 8, 6),
    A.MUSCLE: (50, 60, 4, 4), A.SOFT: (40, 80, 5, 5), A.BLOOD: (45, 160, 2, 2),
    A.LIVER: (60, 110, 4, 3), A.SPLEEN: (50, 115, 3, 3), A.CORTEX: (40, 165, 3, 3),
    A.MEDULLA: (38, 150, 3, 3), A.BONE: (700, 700, 60, 40), A.MARROW: (250, 260, 40, 30),
    A.GUT: (18, 18, 6, 6), A.GAS: (-950, -950, 20, 10), A.CSF: (5, 5, 2, 2),
    A.DISC: (80, 85, 5, 5), A.VESSEL: (40, 150, 5, 5), A.CYST: (5, 5, 1, 1),
    A.MASS: (5, 45, 8, 10), A.MASS_RIM: (20, 90, 5, 8), A.MASS_CORE: (0, 10, 4, 4),
    A.CALC: (750, 750, 80, 60), A.HAEM: (100, 55, 4, 6), A.FLUID: (8, 8, 2, 2),
}
# MRI, arbitrary units (ADC in 1e-6 mm^2/s): tissue -> (T1, T2, FLAIR, DWI, ADC, T1C).
# T1C is a fat-suppressed post-contrast T1; DWI is fat-suppressed (b ~ 800).
_MR = {
    A.AIR: (0, 0, 0, 0, 0, 0), A.LUNG: (30, 40, 30, 20, 60, 40),
    A.FAT: (900, 700, 550, 40, 150, 120), A.MUSCLE: (350, 150, 180, 120, 1400, 420),
    A.SOFT: (420, 320, 300, 220, 1500, 650), A.BLOOD: (120, 100, 100, 40, 2500, 900),
    A.LIVER: (520, 180, 210, 260, 1100, 720), A.SPLEEN: (380, 420, 380, 480, 800, 760),
    A.CORTEX: (450, 420, 360, 380, 2000, 900), A.MEDULLA: (330, 560, 400, 330, 2100, 750),
    A.BONE: (40, 40, 40, 20, 300, 40), A.MARROW: (700, 450, 400, 80, 500, 260),
    A.GUT: (250, 750, 200, 120, 2600, 280), A.GAS: (10, 10, 10, 5, 0, 10),
    A.CSF: (120, 1000, 100, 150, 3000, 130), A.DISC: (300, 500, 350, 250, 1600, 350),
    A.VESSEL: (80, 80, 60, 30, 2000, 700), A.CYST: (100, 1000, 140, 130, 3000, 110),
    A.MASS: (300, 550, 480, 900, 600, 1000), A.MASS_RIM: (320, 500, 450, 850, 650, 1150),
    A.MASS_CORE: (180, 800, 300, 400, 1800, 250), A.CALC: (40, 40, 40, 30, 300, 40),
    A.HAEM: (880, 650, 700, 500, 700, 860), A.FLUID: (110, 950, 120, 140, 3000, 130),
}
_MR_TEXTURE = {A.LUNG: (0.2, 0.2), A.MASS: (0.08, 0.12), A.MASS_RIM: (0.08, 0.12),
               A.HAEM: (0.05, 0.08)}                 # others: (0.04, 0.03) of the mean


def _table(values: dict, column: int, default: float = 0.0) -> np.ndarray:
    lut = np.full(A.N_TISSUES, default, np.float32)
    for tissue, row in values.items():
        lut[tissue] = row[column]
    return lut


class FindingFacts:
    """What the report and question writers read from a truth's ``findings``."""

    findings: list[Finding]

    @property
    def organ_labels(self) -> dict[str, set[str]]:
        """Per-organ abnormality labels: every organ of ORGANS -> set of kinds present."""
        out: dict[str, set[str]] = {organ: set() for organ in ORGANS}
        for f in self.findings:
            out[f.organ].add(f.kind)
        return out

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(f.organ, f.kind) for f in self.findings}


@dataclass
class GroundTruth(FindingFacts):
    """What a phantom contains; label and finding maps index like the volume arrays."""

    seed: int
    modality: str                              # "CT" or "MR"
    findings: list[Finding]
    label_map: np.ndarray                      # uint8, values of LABELS (0 = other)
    finding_map: np.ndarray                    # uint8, i + 1 where findings[i] is drawn
    phase: str | None = None                   # CT contrast phase (CT_PHASES)
    sequences: tuple[str, ...] = ()            # MR sequences of the study
    label_table: dict[int, str] = field(default_factory=lambda: dict(LABELS))

    def to_json(self) -> dict:
        return {"seed": self.seed, "modality": self.modality, "phase": self.phase,
                "sequences": list(self.sequences), "generator_version": GENERATOR_VERSION,
                "findings": [f.to_json() for f in self.findings],
                "organ_labels": {o: sorted(k) for o, k in self.organ_labels.items()},
                "label_table": {str(k): v for k, v in self.label_table.items()}}


@dataclass
class Phantom:
    volume: Volume
    truth: GroundTruth


@dataclass
class MRStudy:
    volumes: dict[str, Volume]                 # sequence -> volume, one shared geometry
    truth: GroundTruth


@dataclass
class _Scene:
    anatomy: A.Anatomy
    findings: list[Finding]
    finding_map: np.ndarray
    affine: np.ndarray
    orientation: str
    flips: tuple[int, ...]
    render_rng: np.random.Generator

    def stored(self, array: np.ndarray) -> np.ndarray:
        """A canonical (RAS-index) array in this phantom's stored layout."""
        return np.ascontiguousarray(np.flip(array, self.flips)) if self.flips else array


def _scene(seed: int, shape, n_findings: int | None) -> _Scene:
    if shape is not None and (len(shape) != 3 or min(int(n) for n in shape) < 16):
        raise ValueError(f"phantom shape must be three sizes >= 16, got {shape!r}")
    anat_ss, lesion_ss, geo_ss, render_ss = np.random.SeedSequence(seed).spawn(4)
    anat = A.build_anatomy(np.random.default_rng(anat_ss), shape)
    findings, fmap = place_findings(anat, np.random.default_rng(lesion_ss), n_findings)
    geo = np.random.default_rng(geo_ss)
    orientation = str(geo.choice(ORIENTATIONS))
    flips = tuple(n for n, code in enumerate(orientation) if code in "LPI")
    offset = geo.uniform([-40, -60, -150], [40, 20, 150])   # scanner coordinates of the body
    g, affine = anat.grid, np.eye(4)
    for n in range(3):
        first = g.origin[n] + offset[n]
        if n in flips:
            affine[n, n], affine[n, 3] = -g.spacing[n], first + (g.shape[n] - 1) * g.spacing[n]
        else:
            affine[n, n], affine[n, 3] = g.spacing[n], first
    findings = [replace(f, center_mm=tuple(float(c + o) for c, o in zip(f.center_mm, offset)))
                for f in findings]
    return _Scene(anat, findings, fmap, affine, orientation, flips,
                  np.random.default_rng(render_ss))


def _truth(scene: _Scene, seed: int, modality: str, **extra) -> GroundTruth:
    return GroundTruth(seed, modality, scene.findings, scene.stored(scene.anatomy.labels),
                       scene.stored(scene.finding_map), **extra)


def _blur(a: np.ndarray, weights=(0.1, 0.1, 0.05)) -> np.ndarray:
    """Partial-volume smoothing: a 3-tap kernel (w, 1 - 2w, w) along each axis."""
    for axis, w in enumerate(weights):
        b = np.moveaxis(a, axis, 0)
        out = b * (1 - 2 * w)
        out[1:] += w * b[:-1]
        out[:-1] += w * b[1:]
        out[0] += w * b[0]
        out[-1] += w * b[-1]
        a = np.moveaxis(out, 0, axis)
    return a


def _metadata(scene: _Scene, seed: int, **extra) -> dict:
    return {"seed": seed, "orientation": scene.orientation, "phantom": True,
            "generator_version": GENERATOR_VERSION, **extra}


def make_ct_phantom(seed: int, *, shape=None, n_findings: int | None = None) -> Phantom:
    """A CT phantom in HU (int16) with its ground truth; ``shape`` keeps the field of view."""
    scene = _scene(seed, shape, n_findings)
    rng, anat = scene.render_rng, scene.anatomy
    col = 1 if rng.random() < 0.5 else 0
    phase = CT_PHASES[col]
    t = anat.tissue
    hu = (_table(_CT, col)[t] + _table(_CT, 2)[t] * anat.texture[0]
          + _table(_CT, 3)[t] * anat.texture[1])
    hu = _blur(hu)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(5, 8))
    array = scene.stored(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    volume = Volume(array, scene.affine, "CT", None,
                    _metadata(scene, seed, phase=phase), f"ct_phantom_seed{seed}")
    return Phantom(volume, _truth(scene, seed, "CT", phase=phase))


def make_mr_study(seed: int, sequences=MR_SEQUENCES, *, shape=None,
                  n_findings: int | None = None) -> MRStudy:
    """The same anatomy as ``make_ct_phantom(seed)`` imaged with several MRI sequences."""
    sequences = tuple(sequences)
    unknown = [s for s in sequences if s not in MR_SEQUENCES]
    if unknown or not sequences:
        raise ValueError(f"sequences must be a non-empty subset of {MR_SEQUENCES}, got {sequences}")
    scene = _scene(seed, shape, n_findings)
    rng, anat = scene.render_rng, scene.anatomy
    t, g = anat.tissue, anat.grid
    # Smooth receive-coil bias field shared by all sequences (not applied to the ADC map).
    x, y, z = ((g.axis(n) - g.axis(n).mean()) / (g.shape[n] * g.spacing[n]) for n in range(3))
    c = rng.uniform(-0.25, 0.25, 5)
    bias = np.exp(c[0] * x[:, None, None] + c[1] * y[None, :, None] + c[2] * z[None, None, :]
                  + c[3] * (x[:, None, None] ** 2 + y[None, :, None] ** 2) * 2)
    sigma = float(rng.uniform(15, 30))
    coarse, fine = _table(_MR_TEXTURE, 0, 0.04)[t], _table(_MR_TEXTURE, 1, 0.03)[t]
    texture = 1 + coarse * anat.texture[0] + fine * anat.texture[1]
    volumes = {}
    for seq in sequences:
        col = MR_SEQUENCES.index(seq)
        signal = _table(_MR, col)[t] * texture
        if seq == "ADC":          # a computed map: no bias field, Gaussian noise, no negatives
            signal = _blur(signal) + rng.standard_normal(t.shape, dtype=np.float32) * 2 * sigma
            signal = np.maximum(signal, 0)
        else:                     # magnitude image: Rician noise on a biased signal
            signal = _blur(signal * bias.astype(np.float32))
            s = sigma * (1.5 if seq == "DWI" else 1.0)
            re = signal + rng.standard_normal(t.shape, dtype=np.float32) * np.float32(s)
            im = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(s)
            signal = np.sqrt(re * re + im * im)
        array = scene.stored(np.clip(np.rint(signal), 0, 32767).astype(np.int16))
        volumes[seq] = Volume(array, scene.affine, "MR", seq, _metadata(scene, seed),
                              f"mr_phantom_seed{seed}_{seq}")
    return MRStudy(volumes, _truth(scene, seed, "MR", sequences=sequences))
