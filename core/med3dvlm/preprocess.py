"""Volume -> model input tensor (1, D, H, W) in [0, 1]: orientation, intensity, crop, resize.

What the released Med3DVLM weights expect (see the official-release notes): voxel axes
(D, H, W) = (z, y, x) of the volume in ITK/DICOM LPS orientation, intensities display-windowed
and scaled to [0, 1], the zero border cropped (MONAI ``CropForeground``, voxels > 0) and the
result resized trilinearly to the model shape. A volume that is already in [0, 1] at the model
shape (the official demo data) reaches the model unchanged apart from reorientation.

Speed: the work runs in torch on the stored voxels; intensity statistics and the foreground box
are computed on the raw integers, only the cropped box is converted to float once, and flips /
axis permutations are applied to the small resized output (linear interpolation with
``align_corners=False`` commutes with them).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .errors import VolumeError
from .validation import validate_volume
from .volume import Volume

# CT display windows (level, width) in HU by body region.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "chest": (-600.0, 1500.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}
DEFAULT_BODY_REGION = "abdomen"
INTENSITY_MODES = ("auto", "window", "minmax", "percentile")
RESIZE_MODES = ("trilinear", "crop_pad")
MODEL_AXES = "DHW"
_PERCENTILE_SAMPLES = 1_000_000  # voxels used to estimate MR percentiles on large volumes
_OBLIQUE_DEGREES = 0.01  # affines this close to the axes count as axis-aligned (header noise)
# Letter -> (RAS world axis, direction of increasing index).
_LETTERS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
# Dtypes torch cannot compare/reduce on the CPU -> the nearest one it can.
_TORCH_SAFE = {np.dtype(np.bool_): np.uint8, np.dtype(np.uint16): np.int32,
               np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64,
               np.dtype(np.float16): np.float32}


def _target_axes(orientation: str) -> list[tuple[int, int]]:
    """(world axis, direction) for model axes D, H, W = the orientation's (k, j, i)."""
    codes = orientation.upper()
    if len(codes) != 3 or any(c not in _LETTERS for c in codes) or \
            len({_LETTERS[c][0] for c in codes}) != 3:
        raise ValueError(f"orientation must be three axis codes like 'LPS' or 'RAS', got {orientation!r}")
    return [_LETTERS[c] for c in reversed(codes)]


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn a volume into model input.

    shape: model input (D, H, W).
    orientation: axis codes the volume is reoriented to before the array is read as (k, j, i);
        "LPS" reproduces SimpleITK's ``GetArrayFromImage`` of an LPS image.
    intensity: "auto" (CT or HU-range data -> window, MR -> percentile, else min-max; data
        already in [0, 1] is kept), or force "window", "minmax" or "percentile".
    window: CT (level, width) in HU; None uses ``WINDOWS[body_region]``.
    body_region: key of ``WINDOWS``; None means ``DEFAULT_BODY_REGION`` (abdomen).
    percentiles: low/high percentiles mapped to 0 and 1 for MR (computed per volume, hence per
        sequence).
    crop_foreground: crop to the box of voxels > 0 after scaling (MONAI CropForeground).
    spacing: resample to this voxel size (mm, along D, H, W) before a centred crop/pad; only
        with resize_mode "crop_pad" (a trilinear resize to ``shape`` would undo it).
    resize_mode: "trilinear" (stretch to ``shape``) or "crop_pad" (keep the scale, centre
        crop or zero-pad to ``shape``).
    dtype: dtype of the returned tensor.
    """

    shape: tuple[int, int, int] = (128, 256, 256)
    orientation: str = "LPS"
    intensity: str = "auto"
    window: tuple[float, float] | None = None
    body_region: str | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    spacing: tuple[float, float, float] | None = None
    resize_mode: str = "trilinear"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("shape", "window", "percentiles", "spacing"):  # lists from JSON/CLI -> tuples
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"shape must be three positive sizes (D, H, W), got {self.shape}")
        _target_axes(self.orientation)
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.window is not None and not self.window[1] > 0:
            raise ValueError(f"window width must be > 0, got {self.window}")
        if self.body_region is not None and self.body_region not in WINDOWS:
            raise ValueError(f"body_region must be one of {sorted(WINDOWS)}, got {self.body_region!r}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.spacing is not None and (self.resize_mode != "crop_pad" or len(self.spacing) != 3
                                         or min(self.spacing) <= 0):
            raise ValueError("spacing needs three positive sizes in mm and resize_mode='crop_pad'")


# The released Med3DVLM (DCFormer input 128 x 256 x 256).
MED3DVLM = PreprocessConfig(shape=(128, 256, 256))
# M3D-LaMed (3D ViT input 32 x 256 x 256), same preprocessing otherwise.
M3D_LAMED = PreprocessConfig(shape=(32, 256, 256))
# The project's small demo model trained on synthetic phantoms.
DEMO = PreprocessConfig(shape=(32, 128, 128))
PRESETS: dict[str, PreprocessConfig] = {"med3dvlm": MED3DVLM, "m3d_lamed": M3D_LAMED, "demo": DEMO}


@dataclass
class _Scaling:
    """Raw value ``low`` -> 0 and ``high`` -> 1; ``clamp`` when raw values exceed [low, high]."""

    low: float
    high: float
    clamp: bool
    text: str
    mode: str  # "kept", "window", "percentile" or "minmax": what was applied (provenance)
    window: tuple[float, float] | None = None  # (level, width) when a CT window was applied

    @property
    def identity(self) -> bool:
        return self.low == 0 and self.high == 1 and not self.clamp


@dataclass
class _Plan:
    """Decisions for one volume; the tensor is the stored voxels in a stride-friendly axis order."""

    voxels: torch.Tensor  # canonical axes: positive strides, slowest axis first
    order: tuple[int, ...]  # canonical axis n is model axis order[n]
    flips: tuple[int, ...]  # model axes to flip at the end
    spacing: tuple[float, ...]  # mm, canonical axes
    scaling: _Scaling
    box: tuple[slice, ...]  # foreground crop, canonical axes
    identity: bool  # already model-ready: only reorientation
    steps: list[str]
    applied: dict  # the concrete values, plain JSON (see ``applied``)


def model_axes(volume: Volume, orientation: str) -> tuple[list[int], list[bool]]:
    """For model axes D, H, W: the stored axis (0, 1, 2 = i, j, k) each one reads, and whether it
    reads that axis backwards (what reorientation to ``orientation`` does to this volume)."""
    ornt = nib.orientations.io_orientation(volume.affine)
    if np.isnan(ornt).any():
        raise VolumeError(f"{volume.name} has a degenerate voxel-to-world transform; its header is broken.")
    sources, flips = [], []
    for world, direction in _target_axes(orientation):
        axis = int(np.flatnonzero(ornt[:, 0] == world)[0])
        sources.append(axis)
        flips.append(int(ornt[axis, 1]) != direction)
    return sources, flips


def _orient(volume: Volume, orientation: str) -> tuple[np.ndarray, tuple[float, ...], str]:
    """Array view in model axes (D, H, W), spacing along them, and a sentence on what was done."""
    sources, flips = model_axes(volume, orientation)
    ornt = nib.orientations.io_orientation(volume.affine)
    view = np.transpose(volume.array, sources)
    view = np.flip(view, [d for d in range(3) if flips[d]]) if any(flips) else view
    spacing = tuple(volume.spacing[a] for a in sources)

    stored = "".join(nib.orientations.ornt2axcodes(ornt))
    names = ", ".join("ijk"[a] for a in sources)
    flipped = [m for m, f in zip(MODEL_AXES, flips) if f]
    target = orientation.upper()
    text = (f"reorient {stored} -> {target} (flip {', '.join(flipped) or 'none'})" if stored != target
            else f"already {target} (no reorientation)") + f"; model axes (D, H, W) = stored ({names})"
    directions = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    off_axis = math.degrees(math.acos(min(1.0, float(np.abs(directions).max(axis=0).min()))))
    if off_axis > _OBLIQUE_DEGREES:
        text += (f"; the affine is oblique (up to {off_axis:.1f} deg off axis): nearest axes used, "
                 "no resampling")
    return view, spacing, text


def _as_tensor(view: np.ndarray, device: torch.device) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """Zero-copy tensor of ``view`` with positive strides, slowest axis first (for speed).

    Returns the tensor, ``order`` (its axis n is view axis order[n]) and the view axes that were
    flipped to make strides positive (to be flipped back on the output).
    """
    negative = tuple(d for d in range(3) if view.strides[d] < 0)
    array = np.flip(view, negative) if negative else view
    order = tuple(sorted(range(3), key=lambda d: -abs(array.strides[d])))
    array = array.transpose(order)
    native = array.dtype.newbyteorder("=")
    usable = np.dtype(_TORCH_SAFE.get(native, native))
    if array.dtype != usable:  # big-endian files, or types torch cannot compare on the CPU
        array = array.astype(usable)
    with warnings.catch_warnings():  # read-only arrays (memory maps) are fine: we never write
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.to(device), order, negative


def _percentiles(voxels: torch.Tensor, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Percentiles on a regular subsample of at most ~1M voxels (exact for small volumes)."""
    step = max(1, math.ceil((voxels.numel() / _PERCENTILE_SAMPLES) ** (1 / 3)))
    sample = voxels[::step, ::step, ::step].cpu().numpy()
    low, high = np.percentile(sample, percentiles)  # partition-based: linear time
    return float(low), float(high)


def _scaling(volume: Volume, voxels: torch.Tensor, config: PreprocessConfig) -> _Scaling:
    """The intensity policy: which raw values map to 0 and 1 (see ``PreprocessConfig.intensity``)."""
    low, high = (float(v) for v in torch.aminmax(voxels))
    mode = config.intensity
    if mode == "auto":
        if 0 <= low and high <= 1:
            return _Scaling(0.0, 1.0, False, f"intensities already in [0, 1] ({low:.4g} to {high:.4g}): kept",
                            "kept")
        hu_like = volume.modality == "unknown" and low <= -500 and high > 0
        mode = ("window" if volume.modality == "CT" or hu_like else
                "percentile" if volume.modality == "MR" else "minmax")
    if mode == "window":
        region = config.body_region or DEFAULT_BODY_REGION
        level, width = config.window or WINDOWS[region]
        source = "given" if config.window else region
        return _Scaling(level - width / 2, level + width / 2, True,
                        f"CT window L{level:g}/W{width:g} ({source}): [{level - width / 2:g}, "
                        f"{level + width / 2:g}] HU -> [0, 1]", "window", (float(level), float(width)))
    if mode == "percentile":
        p_low, p_high = _percentiles(voxels, config.percentiles)
        if p_high > p_low:
            sequence = volume.sequence or "sequence unknown"
            return _Scaling(p_low, p_high, True,
                            f"{volume.modality} ({sequence}) percentiles p{config.percentiles[0]:g}-"
                            f"p{config.percentiles[1]:g} of this volume = [{p_low:.4g}, {p_high:.4g}]"
                            " -> [0, 1]", "percentile")
    if high <= low:
        raise VolumeError(f"{volume.name} is constant (every voxel is {low:g}); it holds no image.")
    prefix = "percentiles coincide; " if mode == "percentile" else ""
    return _Scaling(low, high, False, f"{prefix}min-max [{low:.4g}, {high:.4g}] -> [0, 1]", "minmax")


def _foreground_box(volume: Volume, voxels: torch.Tensor, scaling: _Scaling) -> tuple[slice, ...]:
    """Box of voxels that scale to > 0, i.e. raw > scaling.low, from per-axis maxima."""
    plane = voxels.amax(dim=0)  # one pass over the volume gives the two fast axes
    profiles = (voxels.amax(dim=(1, 2)), plane.amax(dim=1), plane.amax(dim=0))
    box = []
    for profile in profiles:
        inside = torch.nonzero(profile > scaling.low).reshape(-1)
        if inside.numel() == 0:
            raise VolumeError(
                f"{volume.name} has no voxel above {scaling.low:g} ({scaling.text}), so it would be "
                "blank; choose another window or body region, or intensity='minmax'.")
        box.append(slice(int(inside[0]), int(inside[-1]) + 1))
    return tuple(box)


def _dims(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _model_order(canonical, order: tuple[int, ...]) -> tuple:
    """Values listed along canonical axes -> listed along model axes (D, H, W)."""
    return tuple(canonical[order.index(d)] for d in range(3))


def _plan(volume: Volume, config: PreprocessConfig, device: torch.device) -> _Plan:
    """Everything decided from the volume (shared by ``preprocess`` and ``describe``)."""
    volume = validate_volume(volume)
    view, spacing, orient_text = _orient(volume, config.orientation)
    voxels, order, flips = _as_tensor(view, device)
    spacing_c = tuple(spacing[a] for a in order)
    scaling = _scaling(volume, voxels, config)
    steps = [orient_text]
    full = tuple(slice(0, n) for n in voxels.shape)
    if scaling.identity and view.shape == config.shape:
        steps.append(f"already model-ready: in [0, 1] at {_dims(config.shape)}, passed unchanged")
        return _Plan(voxels, order, flips, spacing_c, scaling, full, True, steps,
                     _record(view.shape, orient_text, scaling, None, config, steps))
    steps.append(scaling.text)
    box = full
    if config.crop_foreground:
        box = _foreground_box(volume, voxels, scaling)
        before, after = view.shape, _model_order([b.stop - b.start for b in box], order)
        steps.append(f"crop foreground (> 0 after scaling): {_dims(before)} -> {_dims(after)}"
                     if after != before else "crop foreground: nothing to crop")
    size = _model_order([b.stop - b.start for b in box], order)
    if config.resize_mode == "trilinear":
        steps.append(f"resize (trilinear) {_dims(size)} -> {_dims(config.shape)}"
                     if size != tuple(config.shape) else "resize: already at the model shape")
    else:
        if config.spacing is not None:
            resampled = _resampled_size(size, spacing, config.spacing)
            steps.append(f"resample {'x'.join(f'{s:.3g}' for s in spacing)} mm -> "
                         f"{'x'.join(f'{s:g}' for s in config.spacing)} mm: {_dims(size)} -> "
                         f"{_dims(resampled)}")
            size = resampled
        steps.append(f"centre crop/zero-pad {_dims(size)} -> {_dims(config.shape)}")
    crop = _view_box(box, order, flips, view.shape) if config.crop_foreground else None
    return _Plan(voxels, order, flips, spacing_c, scaling, box, False, steps,
                 _record(view.shape, orient_text, scaling, crop, config, steps))


def _view_box(box: tuple[slice, ...], order: tuple[int, ...], flips: tuple[int, ...], shape) -> list[list[int]]:
    """The crop box as [start, stop) per model axis (D, H, W) of the reoriented volume (the
    canonical tensor runs backwards along the ``flips`` axes)."""
    spans = []
    for d in range(3):
        part, n = box[order.index(d)], shape[d]
        spans.append([n - part.stop, n - part.start] if d in flips else [part.start, part.stop])
    return spans


def _record(shape, orient_text: str, scaling: _Scaling, crop, config: PreprocessConfig, steps) -> dict:
    return {"orientation": config.orientation.upper(), "reoriented_shape": [int(n) for n in shape],
            "intensity": scaling.mode, "window": list(scaling.window) if scaling.window else None,
            "range": [scaling.low, scaling.high],  # raw values mapped to 0 and 1
            "crop_box": crop, "resize": config.resize_mode, "spacing": list(config.spacing) if config.spacing else None,
            "output_shape": [int(n) for n in config.shape], "steps": list(steps)}


def _resampled_size(size, spacing, target) -> tuple[int, ...]:
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(size, spacing, target))


def _crop_pad(image: torch.Tensor, shape: tuple[int, ...], backwards: tuple[int, ...] = ()) -> torch.Tensor:
    """Centre crop or zero-pad the last three axes to ``shape``. An odd difference leaves the extra
    voxel at the end of the model's axis, so along the ``backwards`` axes (flipped later) at the start:
    the result does not depend on how the volume was stored."""
    def before(excess: int, axis: int) -> int:
        return excess - excess // 2 if axis in backwards else excess // 2

    crops = tuple(slice(before(n - m, a), before(n - m, a) + m) if n > m else slice(0, n)
                  for a, (n, m) in enumerate(zip(image.shape[-3:], shape)))
    image = image[(..., *crops)]
    pads = []
    for a in reversed(range(3)):  # F.pad lists the last axis first
        excess = shape[a] - image.shape[-3 + a]
        pads += [before(excess, a), excess - before(excess, a)]
    return F.pad(image, pads) if any(pads) else image


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _to_model_grid(plan: _Plan, config: PreprocessConfig) -> torch.Tensor:
    """Crop, convert, clamp, resize and scale, all in the canonical axis order."""
    low, high = plan.scaling.low, plan.scaling.high
    # The one conversion of the big array; a copy when clamping so the caller's data is untouched.
    image = plan.voxels[plan.box].to(torch.float32, copy=plan.scaling.clamp)
    if plan.scaling.clamp:
        image.clamp_(low, high)
    target = tuple(config.shape[d] for d in plan.order)
    size = target
    if config.resize_mode == "crop_pad":
        size = tuple(image.shape) if config.spacing is None else _resampled_size(
            image.shape, plan.spacing, tuple(config.spacing[d] for d in plan.order))
    if size != tuple(image.shape):
        image = F.interpolate(image[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    if not plan.scaling.identity:  # linear, so done after the resize on far fewer voxels
        image = image.sub(low) if _shares_memory(image, plan.voxels) else image.sub_(low)
        image.div_(high - low)
    image.clamp_(0.0, 1.0)  # interpolation rounding may step a hair outside
    if config.resize_mode == "trilinear":
        return image
    return _crop_pad(image, target, tuple(n for n in range(3) if plan.order[n] in plan.flips))


def preprocess(volume: Volume, config: PreprocessConfig = MED3DVLM,
               device: str | torch.device | None = None) -> torch.Tensor:
    """Model input (1, D, H, W) of ``config.dtype`` in [0, 1] on ``device`` (default CPU).

    Raises VolumeError for unusable volumes (see ``validation.validate_volume``) and for volumes
    left blank by the chosen window.
    """
    return prepare(volume, config, device)[0]


def prepare(volume: Volume, config: PreprocessConfig = MED3DVLM,
            device: str | torch.device | None = None) -> tuple[torch.Tensor, dict]:
    """``preprocess`` and the record of what it applied (``applied``), planned once."""
    plan = _plan(volume, config, torch.device(device or "cpu"))
    return _render(plan, config)[None], plan.applied


def _render(plan: _Plan, config: PreprocessConfig) -> torch.Tensor:
    image = plan.voxels if plan.identity else _to_model_grid(plan, config)
    if plan.flips:  # flip while the axes are still in memory order: one contiguous copy
        image = image.flip([plan.order.index(d) for d in plan.flips])
    image = image.permute(_model_order(range(3), plan.order)).to(config.dtype).contiguous()
    if _shares_memory(image, plan.voxels):  # never hand out a view of the caller's array
        image = image.clone()
    return image


def carry(volume: Volume, maps: np.ndarray, config: PreprocessConfig = MED3DVLM) -> torch.Tensor:
    """Maps on the volume's voxel grid (C, i, j, k), values in [0, 1] (e.g. one-hot masks),
    taken through exactly the reorientation, crop and resize of the volume's pixels.

    Returns (C, D, H, W) float32 aligned voxel for voxel with ``preprocess(volume, config)``:
    a one-hot mask becomes the occupancy of each model voxel. The crop box is the image's.
    """
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[1:] != volume.array.shape:
        raise ValueError(f"maps must be (C, {', '.join(map(str, volume.array.shape))}), got {maps.shape}")
    plan = _plan(volume, config, torch.device("cpu"))
    identity = _Scaling(0.0, 1.0, False, "", "kept")
    out = []
    for channel in maps:
        laid_out = np.empty_like(volume.array, dtype=np.float32)  # the image's memory layout,
        laid_out[...] = channel                                   # hence the same axis order
        view, _, _ = _orient(dataclasses.replace(volume, array=laid_out), config.orientation)
        voxels, order, flips = _as_tensor(view, torch.device("cpu"))
        assert (order, flips) == (plan.order, plan.flips)
        mapped = dataclasses.replace(plan, voxels=voxels, scaling=identity)
        out.append(_render(mapped, dataclasses.replace(config, dtype=torch.float32)))
    return torch.stack(out)


def describe(volume: Volume, config: PreprocessConfig = MED3DVLM) -> list[str]:
    """Human-readable steps ``preprocess`` would apply to ``volume`` (for ``med3dvlm info``)."""
    return _plan(volume, config, torch.device("cpu")).steps


def applied(volume: Volume, config: PreprocessConfig = MED3DVLM) -> dict:
    """The concrete preprocessing of ``volume`` as plain JSON (provenance): orientation and the
    reoriented shape, intensity mode, CT window (level, width), the raw range mapped to [0, 1],
    the foreground crop box ([start, stop) per model axis D, H, W of the reoriented volume; None
    when not cropping), resize mode, output shape and the human-readable steps."""
    return _plan(volume, config, torch.device("cpu")).applied
