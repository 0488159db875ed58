"""Abnormalities of the phantoms: vocabulary, random choice, placement and painting.

A finding is decided as (organ, kind, location) first and then placed inside the organ's
region for that location, so the ground truth describes what is drawn, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import anatomy as A

ORGANS = ("liver", "spleen", "left kidney", "right kidney", "left lung", "right lung")
ABNORMALITIES = ("cyst", "mass", "calcification", "haemorrhage", "fluid")
_SOLID = ("cyst", "mass", "calcification", "haemorrhage")
ALLOWED: dict[str, tuple[str, ...]] = {
    "liver": ABNORMALITIES, "spleen": _SOLID, "left kidney": _SOLID, "right kidney": _SOLID,
    "left lung": ("mass", "calcification", "fluid"),
    "right lung": ("mass", "calcification", "fluid"),
}
# Every (organ, kind) a phantom can hold: the label set of the demo models.
PAIRS: tuple[tuple[str, str], ...] = tuple((organ, kind) for organ in ORGANS for kind in ALLOWED[organ])
_POLES = ("upper pole", "interpolar region", "lower pole")
# Where a focal lesion can sit; fluid has one location per organ (FLUID_LOCATION).
LOCATIONS: dict[str, tuple[str, ...]] = {
    "liver": ("left lobe", "anterior right lobe", "posterior right lobe", "dome"),
    "spleen": _POLES, "left kidney": _POLES, "right kidney": _POLES,
    "left lung": ("lower lobe", "lingula"), "right lung": ("lower lobe", "middle lobe"),
}
FLUID_LOCATION = {"liver": "perihepatic", "left lung": "base", "right lung": "base"}
# Diameter (fluid: depth) ranges in mm: large enough to stay visible at 128 x 128 x 32.
SIZE_MM = {"cyst": (20, 45), "mass": (20, 55), "calcification": (16, 24),
           "haemorrhage": (20, 45), "fluid": (15, 35)}
MIN_SIZE_MM = {"cyst": 18, "mass": 18, "calcification": 14, "haemorrhage": 18, "fluid": 12}
# Smallest semi-axis along z (mm): a lesion spans at least two of the demo input's ~9 mm slices.
MIN_HALF_DEPTH_MM = {"cyst": 11, "mass": 11, "calcification": 9, "haemorrhage": 11}
N_FINDINGS_P = (0.25, 0.4, 0.35)          # probability of 0, 1, 2 findings
_TISSUE = {"cyst": A.CYST, "mass": A.MASS, "calcification": A.CALC, "haemorrhage": A.HAEM}


@dataclass(frozen=True)
class Finding:
    organ: str
    kind: str
    size_mm: int                             # longest diameter; for fluid the maximal depth
    location: str
    center_mm: tuple[float, float, float]    # RAS millimetres

    def to_json(self) -> dict:
        return {"organ": self.organ, "kind": self.kind, "size_mm": self.size_mm,
                "location": self.location, "center_mm": [round(v, 1) for v in self.center_mm]}


def present(pairs):
    """Multi-hot torch tensor over ``PAIRS`` of the (organ, kind) pairs given: the label vector of the
    demo models."""
    import torch  # on demand: writing phantoms and datasets needs no torch

    out = torch.zeros(len(PAIRS))
    for pair in pairs:
        out[PAIRS.index(tuple(pair))] = 1
    return out


def place_findings(anat: A.Anatomy, rng: np.random.Generator,
                   n: int | None = None) -> tuple[list[Finding], np.ndarray]:
    """Choose and draw ``n`` findings (random 0-2 if None) with distinct (organ, kind) pairs.

    Returns the findings and the finding map (uint8, value i+1 where finding i is drawn).
    """
    if n is None:
        n = int(rng.choice(len(N_FINDINGS_P), p=N_FINDINGS_P))
    if not 0 <= n <= 4:
        raise ValueError(f"n_findings must be between 0 and 4, got {n}")
    fmap = np.zeros(anat.grid.shape, np.uint8)
    findings: list[Finding] = []
    for _ in range(10 * max(n, 1)):
        if len(findings) == n:
            break
        kind = str(rng.choice(ABNORMALITIES))   # kinds are balanced; the organ follows the kind
        place = _place_fluid if kind == "fluid" else _place_lesion
        for organ in rng.permutation([o for o in ORGANS if kind in ALLOWED[o]]).tolist():
            if any(f.organ == organ and f.kind == kind for f in findings):
                continue
            found = place(anat, rng, organ, kind, fmap, len(findings) + 1)
            if found is not None:
                findings.append(found)
                break
    if len(findings) < n:
        raise RuntimeError(f"could not place {n} findings in this phantom")
    return findings, fmap


def _organ_voxels(anat: A.Anatomy, organ: str):
    idx = np.flatnonzero(anat.labels == A.LABEL_OF[organ])
    a, b, c = np.unravel_index(idx, anat.grid.shape)
    g = anat.grid
    return idx, g.axis(0)[a], g.axis(1)[b], g.axis(2)[c]


def _region(anat: A.Anatomy, organ: str, location: str, x, y, z) -> np.ndarray:
    """Which organ voxels (world x, y, z) belong to a location descriptor."""
    if location in _POLES:
        t = (z - z.min()) / max(float(z.max() - z.min()), 1e-3)
        return {"lower pole": t < 1 / 3, "interpolar region": (t >= 1 / 3) & (t < 2 / 3),
                "upper pole": t >= 2 / 3}[location]
    if organ == "liver":
        right = x >= anat.liver_split
        if location == "left lobe":
            return ~right
        dome = right & (z > z.max() - 0.3 * (z.max() - z.min()))
        if location == "dome":
            return dome
        front = y >= np.median(y[right]) if right.any() else right
        return right & ~dome & (front if location == "anterior right lobe" else ~front)
    front = y >= np.median(y)          # lungs: anterior = middle lobe / lingula
    return ~front if location == "lower lobe" else front


def _place_lesion(anat, rng, organ, kind, fmap, index) -> Finding | None:
    idx, x, y, z = _organ_voxels(anat, organ)
    if idx.size == 0:
        return None
    location = str(rng.choice(LOCATIONS[organ]))
    cand = np.flatnonzero(_region(anat, organ, location, x, y, z))
    if cand.size == 0:
        return None
    label, g = A.LABEL_OF[organ], anat.grid
    size = rng.uniform(*SIZE_MM[kind])
    exophytic = organ.endswith("kidney")
    wobble = {"cyst": 0.04, "mass": 0.3, "calcification": 0.1, "haemorrhage": 0.18}[kind]
    for attempt in range(24):
        if attempt and attempt % 6 == 0:
            size = max(MIN_SIZE_MM[kind], size * 0.8)
        pick = cand[rng.integers(cand.size)]
        center = (float(x[pick]), float(y[pick]), float(z[pick]))
        axes = size / 2 * rng.uniform(0.85, 1.0, 3)
        axes[2] = max(axes[2], MIN_HALF_DEPTH_MM[kind])   # through-plane: survive thick slices
        axes = tuple(float(v) for v in axes)
        blob = A.Blob(center, axes, float(rng.uniform(0, np.pi)), A.random_wobble(rng, wobble))
        sl, r = A.blob_radius(g, blob)
        lesion = r < 1
        in_organ = lesion & (anat.labels[sl] == label)
        inside = in_organ
        if exophytic:            # renal lesions may bulge into the perirenal fat
            inside = inside | (lesion & (anat.labels[sl] == 0) & (anat.tissue[sl] == A.FAT))
        total = lesion.sum()
        if (not total or in_organ.sum() < (0.6 if exophytic else 0.85) * total
                or inside.sum() < 0.9 * total or fmap[sl][lesion].any()):
            continue
        tissue = np.full(r.shape, _TISSUE[kind], np.uint8)
        if kind == "mass":               # enhancing rim around a necrotic core
            tissue[r > 1 - 2.5 / (size / 2)] = A.MASS_RIM
            tissue[r < 0.45] = A.MASS_CORE
        anat.tissue[sl][inside] = tissue[inside]
        anat.labels[sl][inside] = label
        fmap[sl][inside] = index
        return Finding(organ, kind, int(round(2 * max(axes))), location, center)
    return None


def _place_fluid(anat, rng, organ, kind, fmap, index) -> Finding | None:
    """Pleural effusion (dependent crescent at a lung base) or perihepatic ascites."""
    depth = rng.uniform(*SIZE_MM["fluid"])
    g, label = anat.grid, A.LABEL_OF[organ]
    if organ == "liver":
        blob = anat.liver
        sl, r = A.blob_radius(g, blob, margin=0.4)
        x, y, z = g.coords(sl)
        shell = depth / float(np.mean(blob.axes[:2]))
        side = (x > blob.center[0] - 0.2 * blob.axes[0]) | (y > blob.center[1] + 0.3 * blob.axes[1])
        band = (r >= 1 - 0.6 * shell) & (r < 1 + 0.4 * shell) & side
        band &= anat.body_radius(sl) < anat.muscle_inner
        band &= z < anat.diaphragm[sl[:2]][..., None] - 3
        tissue = anat.tissue[sl]
        band &= ((tissue == A.FAT) & (anat.labels[sl] == 0)) | (tissue == A.LIVER)
    else:
        idx, *_ = _organ_voxels(anat, organ)
        if idx.size == 0:
            return None
        a, b, c = np.unravel_index(idx, g.shape)
        sl = tuple(slice(int(v.min()), int(v.max()) + 1) for v in (a, b, c))
        x, y, z = g.coords(sl)
        height = z - anat.diaphragm[sl[:2]][..., None]
        taper = np.clip(1 - height / rng.uniform(50, 90), 0, 1)
        wall_mm = (anat.muscle_inner - anat.body_radius(sl)) * anat.body_axes[1]
        band = (wall_mm < depth * taper) & (y < -0.15 * anat.body_axes[1])
        band &= anat.labels[sl] == label
    band &= fmap[sl] == 0
    if band.sum() < 30:
        return None
    anat.tissue[sl][band] = A.FLUID
    anat.labels[sl][band] = 0          # fluid is not organ parenchyma
    fmap[sl][band] = index
    pts = np.argwhere(band)
    center = tuple(float(g.axis(n)[sl[n]][int(np.median(pts[:, n]))]) for n in range(3))
    return Finding(organ, kind, int(round(depth)), FLUID_LOCATION[organ], center)
