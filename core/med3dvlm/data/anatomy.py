"""Synthetic abdomen / lower-chest anatomy as tissue classes and organ labels on a voxel grid.

Everything here lives on a *canonical* grid whose index axes a, b, c increase towards the
patient's Right, Anterior and Superior (RAS), in millimetres relative to the right diaphragm
dome. ``phantoms.py`` later turns the canonical arrays into a stored layout (LPS, LAS...) and
renders intensities per modality from the tissue classes, so CT and every MRI sequence of one
seed share exactly the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tissue classes: rendering maps each to an intensity per modality/sequence.
(AIR, LUNG, FAT, MUSCLE, SOFT, BLOOD, LIVER, SPLEEN, CORTEX, MEDULLA, BONE, MARROW, GUT, GAS,
 CSF, DISC, VESSEL, CYST, MASS, MASS_RIM, MASS_CORE, CALC, HAEM, FLUID) = range(24)
N_TISSUES = 24

# Organ label map values (uint8); 0 is everything unlabelled.
LABELS: dict[int, str] = {
    1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney", 5: "left lung",
    6: "right lung", 7: "aorta", 8: "bone", 9: "heart", 10: "stomach",
}
LABEL_OF = {name: value for value, name in LABELS.items()}

DEFAULT_SHAPE = (160, 160, 48)
DEFAULT_SPACING = (2.2, 2.2, 6.0)


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: centre (mm), semi-axes (mm), rotation about z, shape wobble."""

    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    angle: float = 0.0
    wobble: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)


@dataclass
class Grid:
    """Canonical RAS grid: world(a, b, c) = origin + (a, b, c) * spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, n: int) -> np.ndarray:
        return (self.origin[n] + np.arange(self.shape[n]) * self.spacing[n]).astype(np.float32)

    def box(self, center, half) -> tuple[slice, slice, slice]:
        """Index slices covering the box of half-widths ``half`` (mm, per axis) at ``center``."""
        out = []
        for n in range(3):
            lo = int(np.floor((center[n] - half[n] - self.origin[n]) / self.spacing[n]))
            hi = int(np.ceil((center[n] + half[n] - self.origin[n]) / self.spacing[n])) + 1
            out.append(slice(min(max(lo, 0), self.shape[n]), min(max(hi, 0), self.shape[n])))
        return tuple(out)

    def coords(self, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open (broadcastable) x, y, z coordinate arrays of a box."""
        x, y, z = (self.axis(n)[sl[n]] for n in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]


@dataclass
class Anatomy:
    grid: Grid
    tissue: np.ndarray                   # uint8 tissue classes, canonical layout
    labels: np.ndarray                   # uint8 organ labels (LABELS), canonical layout
    texture: tuple[np.ndarray, np.ndarray]  # unit smooth noise fields (coarse, fine)
    liver: Blob                          # right-lobe shape, for perihepatic fluid
    body: np.ndarray                     # 2D normalised body radius per (a, b)
    zscale: np.ndarray                   # 1D body scale per c (body radius = body / zscale)
    body_axes: tuple[float, float]       # body semi-axes (mm) along x and y
    muscle_inner: float                  # normalised radius of the inner muscle wall
    diaphragm: np.ndarray                # 2D z (mm) of the diaphragm per (a, b)
    liver_split: float                   # x (mm) of the falciform plane (left | right lobe)

    def body_radius(self, sl) -> np.ndarray:
        """Normalised body radius (1 = skin, ``muscle_inner`` = abdominal cavity) in a box."""
        return self.body[sl[0], sl[1]][:, :, None] / self.zscale[sl[2]][None, None, :]


def blob_radius(grid: Grid, blob: Blob, margin: float = 0.0):
    """Box slices and the normalised radius field (<1 inside) of a deformed ellipsoid.

    The box holds the whole blob plus ``margin`` (in units of the semi-axes) around it.
    """
    a = blob.wobble
    pad = 1.05 + sum(abs(c) for c in a) + margin
    half = max(blob.axes[:2]) * pad
    sl = grid.box(blob.center, (half, half, blob.axes[2] * pad))
    x, y, z = grid.coords(sl)
    ca, sa = np.cos(blob.angle), np.sin(blob.angle)
    dx, dy = x - blob.center[0], y - blob.center[1]
    u = (ca * dx + sa * dy) / blob.axes[0]                 # (a, b, 1)
    v = (-sa * dx + ca * dy) / blob.axes[1]                # (a, b, 1)
    w = (z - blob.center[2]) / blob.axes[2]                # (1, 1, c)
    r = np.sqrt(u * u + v * v + w * w)
    # Low-order deformation of the surface radius. Near the surface the clipped coordinates are
    # close to direction cosines; clipping keeps the scale bounded far away (no spurious
    # spikes) and keeps most operations on 2D or 1D arrays, which is what makes this fast.
    uc, vc, wc = np.clip(u, -1, 1), np.clip(v, -1, 1), np.clip(w, -1, 1)
    scale = (1 + a[0] * uc * vc + a[3] * uc ** 3) + wc * (a[1] * vc + a[2] * uc)
    return sl, r / scale


def random_wobble(rng: np.random.Generator, amount: float) -> tuple[float, ...]:
    return tuple(float(v) for v in rng.uniform(-amount, amount, 4))


def smooth_noise(rng: np.random.Generator, shape, factor: float) -> np.ndarray:
    """Unit-variance noise smooth over ``factor`` voxels (linear upsampling of a coarse grid)."""
    coarse = [max(2, int(round(n / factor)) + 2) for n in shape]
    g = rng.standard_normal(coarse, dtype=np.float32)
    for ax, n in enumerate(shape):
        pos = np.linspace(0.5, coarse[ax] - 1.5, n)
        i0 = np.floor(pos).astype(int)
        w = (pos - i0).astype(np.float32)
        m = np.zeros((n, coarse[ax]), np.float32)
        m[np.arange(n), i0] = 1 - w
        m[np.arange(n), i0 + 1] = w
        g = np.moveaxis(np.tensordot(m, g, axes=(1, ax)), 0, ax)
    return np.ascontiguousarray((g - g.mean()) / (g.std() + 1e-6))


class _Painter:
    """Writes tissue classes and labels into boxes of the canonical arrays."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.tissue = np.full(shape, AIR, np.uint8)
        self.labels = np.zeros(shape, np.uint8)

    def paint(self, sl, mask, tissue: int, label: int | None = None) -> None:
        self.tissue[sl][mask] = tissue
        if label is not None:
            self.labels[sl][mask] = label


def build_anatomy(rng: np.random.Generator, shape=None) -> Anatomy:
    """Random but anatomically placed body, organs, vessels and bones (no abnormalities)."""
    shape = tuple(shape or DEFAULT_SHAPE)
    jitter = rng.uniform(0.93, 1.07, 3) * np.array([1, 1, rng.uniform(0.92, 1.08)])
    jitter[1] = jitter[0]                   # square pixels; the field of view stays ~350 mm
    spacing = tuple(float(s * d / n * j) for s, d, n, j in
                    zip(DEFAULT_SPACING, DEFAULT_SHAPE, shape, jitter))
    extent = [n * s for n, s in zip(shape, spacing)]
    top = rng.uniform(70.0, 100.0)          # mm of chest above the right dome
    origin = (-extent[0] / 2 + rng.uniform(-10, 10), -extent[1] / 2 + rng.uniform(-12, 8),
              top - extent[2])
    grid = Grid(shape, spacing, origin)
    p = _Painter(shape)
    xs, ys, zs = grid.axis(0), grid.axis(1), grid.axis(2)
    X2, Y2 = xs[:, None], ys[None, :]
    full = (slice(None),) * 3

    # Body outline: wobbly ellipse with a flat back; subcutaneous fat, muscle wall, cavity.
    bx, by = rng.uniform(135, 158), rng.uniform(95, 118)
    theta = np.arctan2(Y2, X2)
    e2, e3, f2, f3 = rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03), *rng.uniform(0, 6.3, 2)
    wobble = 1 + e2 * np.cos(2 * theta + f2) + e3 * np.cos(3 * theta + f3)
    rho = np.hypot(X2 / bx, Y2 / by) / wobble
    rho = np.maximum(rho, -Y2 / (0.86 * by)).astype(np.float32)
    zscale = (1 + 0.04 * np.sin(zs / 90.0 + rng.uniform(0, 6.3))).astype(np.float32)
    rho3 = rho[:, :, None] / zscale[None, None, :]
    fat_in = 1 - rng.uniform(8, 28) / by
    muscle_in = fat_in - rng.uniform(9, 15) / by
    p.paint(full, rho3 < 1, FAT)
    p.paint(full, (rho3 < fat_in) & (rho3 >= muscle_in), MUSCLE)
    cavity = rho3 < muscle_in

    # Diaphragm: two domes (right higher), dropping posteriorly into the costophrenic recesses.
    dome_l = -rng.uniform(5, 20)
    def dome(top_z: float, cx: float) -> np.ndarray:
        return top_z - 55 * (((X2 - cx) / 85) ** 2 + ((Y2 + 5) / 95) ** 2)

    diaphragm = (np.maximum(dome(0.0, 0.42 * bx), dome(dome_l, -0.42 * bx))
                 - 35 * np.clip(-Y2 / by, 0, 1) ** 2).astype(np.float32)
    thorax = cavity & (zs[None, None, :] > diaphragm[:, :, None])
    abdomen = cavity & ~thorax

    y_vb = -0.86 * by + rng.uniform(58, 66)    # vertebral body centre
    x_mid = rng.uniform(-4, 4)
    lungs = thorax.copy()
    p.paint(full, lungs & (X2 < x_mid)[:, :, None], LUNG, LABEL_OF["left lung"])
    p.paint(full, lungs & (X2 >= x_mid)[:, :, None], LUNG, LABEL_OF["right lung"])
    mediastinum = ((X2 - x_mid) / 26) ** 2 + ((Y2 - y_vb - 30) / 38) ** 2 < 1
    p.paint(full, thorax & mediastinum[:, :, None], FAT, 0)
    heart = Blob((x_mid - 0.12 * bx, 0.15 * by, rng.uniform(40, 55)),
                 (rng.uniform(50, 62), rng.uniform(40, 50), 55), rng.uniform(-0.5, -0.2),
                 random_wobble(rng, 0.15))
    sl, r = blob_radius(grid, heart)
    p.paint(sl, (r < 1) & thorax[sl], SOFT, LABEL_OF["heart"])

    # Abdominal organs (painted only below the diaphragm).
    stomach = Blob((-0.3 * bx, 0.3 * by, dome_l - rng.uniform(55, 70)),
                   (rng.uniform(35, 45), rng.uniform(28, 35), rng.uniform(35, 45)),
                   rng.uniform(-0.4, 0.4), random_wobble(rng, 0.2))
    sl, r = blob_radius(grid, stomach)
    inside = (r < 1) & abdomen[sl]
    p.paint(sl, inside, SOFT, LABEL_OF["stomach"])
    _, y, _ = grid.coords(sl)
    lumen = inside & (r < 0.82)
    p.paint(sl, lumen, GUT)
    p.paint(sl, lumen & (y > stomach.center[1] + 0.45 * stomach.axes[1]), GAS)

    s = rng.uniform(0.9, 1.1)
    liver = Blob((0.42 * bx, rng.uniform(-0.1, 0.1) * by, -rng.uniform(65, 80)),
                 (0.5 * bx * s, 0.78 * by * s, rng.uniform(75, 88)),
                 rng.uniform(-0.15, 0.15), random_wobble(rng, 0.2))
    liver_left = Blob((-0.05 * bx, 0.42 * by, -rng.uniform(30, 40)),
                      (rng.uniform(45, 60), 0.35 * by, rng.uniform(30, 38)),
                      rng.uniform(-0.3, 0.1), random_wobble(rng, 0.2))
    for blob in (liver, liver_left):
        sl, r = blob_radius(grid, blob)
        below = grid.coords(sl)[2] < diaphragm[sl[:2]][..., None] - 3
        p.paint(sl, (r < 1) & abdomen[sl] & below, LIVER, LABEL_OF["liver"])
    spleen = Blob((-0.62 * bx, -0.3 * by, dome_l - rng.uniform(50, 62)),
                  (rng.uniform(22, 28), rng.uniform(45, 55), rng.uniform(40, 50)),
                  rng.uniform(-0.9, -0.5), random_wobble(rng, 0.2))
    sl, r = blob_radius(grid, spleen)
    p.paint(sl, (r < 1) & abdomen[sl], SPLEEN, LABEL_OF["spleen"])

    zk = -rng.uniform(105, 118)
    for side, sign, dzk in (("left", -1, 0.0), ("right", 1, -rng.uniform(8, 16))):
        kb = Blob((sign * rng.uniform(0.4, 0.48) * bx, y_vb + rng.uniform(0, 12), zk + dzk),
                  (rng.uniform(25, 30), rng.uniform(22, 27), rng.uniform(48, 56)),
                  sign * rng.uniform(0.3, 0.6), random_wobble(rng, 0.1))
        sl, r = blob_radius(grid, kb)
        kid = (r < 1) & abdomen[sl]
        label = LABEL_OF[f"{side} kidney"]
        p.paint(sl, kid, CORTEX, label)
        p.paint(sl, kid & (r < 1 - 7.0 / min(kb.axes[:2])), MEDULLA)
        hilum = Blob((kb.center[0] - sign * 0.65 * kb.axes[0], kb.center[1] + 6, kb.center[2]),
                     (0.45 * kb.axes[0], 0.4 * kb.axes[1], 0.35 * kb.axes[2]))
        hs, hr = blob_radius(grid, hilum)
        p.paint(hs, (hr < 1) & (p.labels[hs] == label), FAT, 0)  # sinus fat: not parenchyma

    # Bowel loops in the lower abdomen: soft-tissue wall around fluid or gas.
    for _ in range(int(rng.integers(6, 13))):
        loop = Blob((rng.uniform(-0.55, 0.55) * bx, rng.uniform(-0.1, 0.6) * by,
                     rng.uniform(origin[2] + 10, -60)), tuple(rng.uniform(10, 20, 3)),
                    rng.uniform(0, 3.1), random_wobble(rng, 0.2))
        sl, r = blob_radius(grid, loop)
        free = (r < 1) & abdomen[sl] & (p.labels[sl] == 0) & (p.tissue[sl] == FAT)
        p.paint(sl, free, SOFT)
        p.paint(sl, free & (r < 0.6), GAS if rng.random() < 0.5 else GUT)

    # Vessels, posterior muscles, spine and ribs (override everything they cross).
    def col(mask2d: np.ndarray) -> np.ndarray:     # a 2D cross-section repeated along z
        return np.broadcast_to(mask2d[:, :, None], shape)

    def circle(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((X2 - cx) / rx) ** 2 + ((Y2 - cy) / ry) ** 2 < 1

    rvb = rng.uniform(17, 21)
    p.paint(full, col(circle(x_mid - 16, y_vb + rvb + 12, 11, 11)), BLOOD, LABEL_OF["aorta"])
    ivc = col(circle(x_mid + 24, y_vb + rvb + 14, 12, 9)) & (zs < -8)[None, None, :]
    p.paint(full, ivc, BLOOD, 0)
    for sx in (-1, 1):
        p.paint(full, col(circle(x_mid + sx * 30, y_vb - 38, 22, 20)) & (rho3 < 1), MUSCLE, 0)
        psoas_r = np.clip((-60 - zs) / 6, 0, 18)[None, None, :]
        d2 = ((X2 - x_mid - sx * (rvb + 12)) ** 2 + (Y2 - y_vb - 4) ** 2)[:, :, None]
        p.paint(full, (d2 < psoas_r ** 2) & (p.labels == 0), MUSCLE)
    vb = circle(x_mid, y_vb, rvb, rvb * 0.9)
    posterior = (circle(x_mid, y_vb - rvb - 10, 15, 13) | circle(x_mid, y_vb - rvb - 24, 5, 10)
                 | circle(x_mid - rvb - 6, y_vb - rvb + 2, 11, 4)
                 | circle(x_mid + rvb + 6, y_vb - rvb + 2, 11, 4)) & (rho < fat_in)
    disc = (((zs - rng.uniform(0, 33)) % 33) < 6)[None, None, :]
    p.paint(full, col(vb | posterior), BONE, LABEL_OF["bone"])
    p.paint(full, col(circle(x_mid, y_vb, rvb - 3, rvb * 0.9 - 3)), MARROW, LABEL_OF["bone"])
    p.paint(full, col(vb) & disc, DISC, 0)
    p.paint(full, col(circle(x_mid, y_vb - rvb - 10, 8, 7)), CSF, 0)
    anterior = np.abs(theta - np.pi / 2) < 0.7
    near_spine = np.abs(theta + np.pi / 2) < 0.35
    slope, period = rng.uniform(25, 40), rng.uniform(28, 34)
    stripes = ((zs[None, None, :] + slope * theta[:, :, None]) % period) < 9
    band = (rho3 >= muscle_in - 0.03) & (rho3 < muscle_in + 0.06)
    ribs = band & stripes & ~col(anterior | near_spine) & (zs > -150)[None, None, :]
    p.paint(full, ribs, BONE, LABEL_OF["bone"])

    texture = (smooth_noise(rng, shape, 6.0), smooth_noise(rng, shape, 2.5))
    lung = p.tissue == LUNG
    p.paint(full, lung & (texture[1] > 2.0), VESSEL)   # lung vessels keep the lung label
    return Anatomy(grid, p.tissue, p.labels, texture, liver, rho, zscale, (bx, by), muscle_in,
                   diaphragm, liver_split=float(x_mid + 0.08 * bx))
