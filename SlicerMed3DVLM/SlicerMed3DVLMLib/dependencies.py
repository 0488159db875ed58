"""First-use installation of the Python packages med3dvlm needs, with the user's consent.

Only called inside Slicer. PyTorch comes from the PyTorch extension's installer (PyTorchUtils),
which picks the build that fits the computer's GPU; the other packages come from PyPI through
``slicer.util.pip_install``. This file imports nothing that may be missing, and it must import on
Python 3.9 (Slicer 5.6/5.8) so that it can say that those Slicer versions are too old.
"""

from __future__ import annotations  # the annotations below are not evaluated on Python 3.9

import importlib
import importlib.metadata
import subprocess
import sys

MINIMUM_PYTHON = (3, 10)  # transformers 5 and the package's own syntax
MINIMUM_SLICER = "5.10"  # the first Slicer with a new enough Python (3.12)

# pip requirements, the same pins as pyproject.toml (a test keeps them in step); numpy comes with Slicer.
# pydicom 2.4 is what Slicer 5.10 bundles for its DICOM module, so it must not be forced to 3.x.
# transformers 5.0 is the first that reads the demo model's tokenizer (measured: 4.57.6 fails).
# h11 is the module's HTTP client; fastapi and uvicorn run the model server in PythonSlicer.
REQUIREMENTS = (
    "nibabel>=5.0",
    "pynrrd>=1.0",
    "pydicom>=2.4",
    "transformers>=5.0,<6",
    "tokenizers>=0.22",
    "sentencepiece>=0.2",
    "protobuf>=4.21",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "pyyaml>=6",
    "h11>=0.14",
    "fastapi>=0.110",
    "uvicorn>=0.29",
)
TORCH_REQUIREMENT = ">=2.2,<3"


class InstallError(Exception):
    """Installation was declined or failed; the message is one sentence that says what to do."""


def unsupported_python(version_info=sys.version_info) -> str | None:
    """One sentence when this Python cannot run Med3DVLM (Slicer older than 5.10), else None."""
    if tuple(version_info[:2]) >= MINIMUM_PYTHON:
        return None
    return (f"Med3DVLM needs 3D Slicer {MINIMUM_SLICER} or newer (Python "
            f"{'.'.join(map(str, MINIMUM_PYTHON))} or newer); this Slicer runs Python "
            f"{version_info[0]}.{version_info[1]}: please install a current Slicer from download.slicer.org.")


def missing_requirements() -> list[str]:
    """The requirements not installed in a fitting version, "torch..." first when it is one of them."""
    from packaging.requirements import Requirement  # ships with Slicer's Python

    missing = []
    for text in ("torch" + TORCH_REQUIREMENT, *REQUIREMENTS):
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def failure_reason(error: BaseException) -> str:
    """A short reason for a failed installer step, without a traceback or a long command line."""
    if isinstance(error, subprocess.CalledProcessError):
        return f"the installer stopped with exit status {error.returncode}; its output is in the Python console"
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def install(missing: list[str]) -> None:
    """Ask, then install ``missing`` (from :func:`missing_requirements`); raises only InstallError."""
    refusal = unsupported_python()
    if refusal:
        raise InstallError(refusal)
    import slicer

    if not slicer.util.confirmOkCancelDisplay(
        "Med3DVLM needs these Python packages, which will be downloaded and installed now "
        "(this can take several minutes):\n\n" + "\n".join(missing),
        "Install Python packages",
    ):
        raise InstallError("Med3DVLM cannot run without its Python packages; press Install to install them.")
    if any(req.startswith("torch") for req in missing):
        _install_torch()
    others = [req for req in missing if not req.startswith("torch")]
    if others:
        try:
            slicer.util.pip_install(others)
        except Exception as error:  # CalledProcessError from pip, OSError, anything: one sentence
            raise InstallError(f"Installing the Python packages failed ({failure_reason(error)}); check the "
                               "internet connection and press Install again.") from error
    importlib.invalidate_caches()  # the new packages must be importable in this session
    still = missing_requirements()
    if still:
        raise InstallError(f"These packages are still missing or too old after installing: {', '.join(still)}; "
                           "restart Slicer and press Install again.")


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError("PyTorch is missing: install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer and open Med3DVLM again.") from None
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT)
    except Exception as error:  # light-the-torch runs as a subprocess: CalledProcessError on failure
        raise InstallError(f"PyTorch could not be installed ({failure_reason(error)}); install it with the "
                           "'PyTorch Util' module, then open Med3DVLM again.") from error
    if torch is None:
        raise InstallError("PyTorch could not be installed; install it with the 'PyTorch Util' module, then "
                           "open Med3DVLM again.")
