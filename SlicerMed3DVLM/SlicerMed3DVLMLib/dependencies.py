"""First-use installation of the Python packages med3dvlm needs, with the user's consent.

Only called inside Slicer. PyTorch comes from the PyTorch extension's installer (PyTorchUtils),
which picks the build that fits the computer's GPU; the other packages come from PyPI through
``slicer.util.pip_install``. This file imports nothing that may be missing.
"""

from __future__ import annotations

import importlib.metadata

# pip requirements, the same pins as pyproject.toml (a test keeps them in step); numpy comes with Slicer.
REQUIREMENTS = (
    "nibabel>=5.0",
    "pynrrd>=1.0",
    "pydicom>=3.0",
    "transformers>=4.45,<6",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "pyyaml>=6",
)
TORCH_REQUIREMENT = ">=2.2,<3"


class InstallError(Exception):
    """Installation was declined or failed; the message says what to do."""


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


def install(missing: list[str]) -> None:
    """Ask, then install ``missing`` (from :func:`missing_requirements`); raises InstallError."""
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
        except Exception as error:  # pip's own message says which package failed and why
            raise InstallError(f"Installing {', '.join(others)} failed ({error}); check the internet "
                               "connection and press Install again.") from error


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError("PyTorch is missing: install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer and open Med3DVLM again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise InstallError("PyTorch could not be installed; install it with the 'PyTorch Util' module, then "
                           "open Med3DVLM again.")
