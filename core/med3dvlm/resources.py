"""Where the bundled resources (demo model, samples) live.

Searched in order: $MED3DVLM_RESOURCES, the repository checkout (editable install or the Slicer
extension, which embeds core/ and resources/ side by side), then a folder packaged with the module.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resources_dir() -> Path:
    candidates = [os.environ.get("MED3DVLM_RESOURCES"), _HERE.parents[1] / "resources", _HERE / "resources"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "The med3dvlm resources folder (demo model, samples) was not found; set MED3DVLM_RESOURCES "
        "to the 'resources' folder of a SlicerMed3DVLM checkout."
    )


def resource_path(*parts: str) -> Path:
    return resources_dir().joinpath(*parts)


def demo_model_dir() -> Path:
    return resource_path("models", "demo")


def demo_detector_dir() -> Path:
    return resource_path("models", "medmap-demo")


def sample_path(name: str) -> Path:
    return resource_path("samples", name)
