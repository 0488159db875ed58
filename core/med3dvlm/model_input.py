"""What the model is given for a volume: the volume cropped to a region of interest, a CT window
chosen by the user, then the preset's preprocessing; and the record of all of it.

The record is ``preprocess.applied``'s plus ``region`` (``region.crop_to_region``'s record, None
for the whole volume). It is the provenance of an answer and, read by ``geometry``, the exact map
between the model's input and the volume's voxels.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch

from .errors import Med3DVLMError, Med3DVLMWarning
from .preprocess import DEFAULT_BODY_REGION, WINDOWS, PreprocessConfig, applied, prepare
from .region import Region, box_text, crop_to_region, parse_region
from .volume import Volume


class WindowWarning(Med3DVLMWarning):
    """A window other than the one the model was trained with was used."""


def parse_window(window: Sequence[float]) -> tuple[float, float]:
    """(centre, width) as floats, or a clear error."""
    try:
        centre, width = (float(v) for v in window)
    except (TypeError, ValueError):
        centre = width = math.nan
    if not (math.isfinite(centre) and math.isfinite(width) and width > 0):
        raise Med3DVLMError(f"A window is (centre, width) in the volume's units (HU for CT) with a positive "
                            f"width; got {window!r}.")
    return centre, width


def with_window(volume: Volume, config: PreprocessConfig, window: Sequence[float]) -> PreprocessConfig:
    """``config`` windowing ``volume`` with (centre, width) instead of the preset's intensity policy;
    warns that the model was trained otherwise (a fixed CT window, or MR percentiles)."""
    centre, width = parse_window(window)
    trained = tuple(config.window or WINDOWS[config.body_region or DEFAULT_BODY_REGION])
    ct_window = config.intensity == "window" or (config.intensity == "auto" and volume.modality != "MR")
    if not ct_window or (centre, width) != trained:
        what = (f"the fixed CT window L{trained[0]:g}/W{trained[1]:g}" if ct_window else
                "min-max scaling" if config.intensity == "minmax" else "per-volume percentile scaling")
        warnings.warn(f"The model was trained with {what}; the window L{centre:g}/W{width:g} shows it "
                      "intensities it was not trained on, so its answers may be less reliable.",
                      WindowWarning, stacklevel=3)
    return dataclasses.replace(config, intensity="window", window=(centre, width))


def framed(volume: Volume, config: PreprocessConfig, region: Region | None = None,
           window: Sequence[float] | None = None) -> tuple[Volume, PreprocessConfig, dict | None]:
    """The volume (cropped to ``region``), the config (with ``window``) and the region's record."""
    if window is not None:
        config = with_window(volume, config, window)
    if region is None:
        return volume, config, None
    cropped, record = crop_to_region(volume, region, config.shape, config.orientation)
    return cropped, config, record


def prepare_input(volume: Volume, config: PreprocessConfig, region: Region | None = None,
                  window: Sequence[float] | None = None,
                  device: str | torch.device | None = None) -> tuple[torch.Tensor, dict]:
    """The model input (1, D, H, W) and its record (see the module's docstring)."""
    cropped, config, region_record = framed(volume, config, region, window)
    image, done = prepare(cropped, config, device)
    return image, _recorded(done, region_record, volume)


def input_record(volume: Volume, config: PreprocessConfig, region: Region | None = None,
                 window: Sequence[float] | None = None) -> dict:
    """The record of ``prepare_input`` without making the input."""
    cropped, config, region_record = framed(volume, config, region, window)
    return _recorded(applied(cropped, config), region_record, volume)


def _recorded(done: dict, region: dict | None, volume: Volume) -> dict:
    if region is None:
        return {**done, "region": None}
    step = (f"crop to the region {box_text(region['ras'])} mm (+{region['margin_mm']:g} mm margin): "
            f"{' x '.join(map(str, volume.shape[:3]))} -> {' x '.join(map(str, region['shape']))} voxels (i, j, k)")
    return {**done, "region": region, "steps": [step, *done["steps"]]}


def framing_key(region: Region | None, window: Sequence[float] | None) -> str:
    """Text that tells apart the inputs one volume gives under different regions and windows (cache keys)."""
    if region is None and window is None:
        return ""
    corners = None if region is None else parse_region(region).tolist()
    levels = None if window is None else list(parse_window(window))
    return f"|region={corners}|window={levels}"
