"""First use inside Slicer: which Python is refused, what the module installs, and that every
install failure reaches the panel as one sentence (slicer.util and PyTorchUtils stand in for the
Slicer application, which cannot run here; the failing installers are real subprocesses)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from SlicerMed3DVLMLib import dependencies
from SlicerMed3DVLMLib.dependencies import InstallError

ROOT = Path(__file__).resolve().parents[1]


def _one_sentence(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text and text.endswith(".") and len(text) < 400


def _python39() -> str | None:
    """Slicer 5.6/5.8's Python, where one is on this machine (pyenv keeps one here)."""
    found = shutil.which("python3.9")
    candidates = [found] if found else []
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    for candidate in candidates:
        try:
            if subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"],
                              capture_output=True, timeout=30).returncode == 0:
                return candidate
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.parametrize("version", [(3, 9, 10), (3, 8, 18)])
def test_python_before_3_10_is_refused_naming_the_slicer_needed(version):
    refusal = dependencies.unsupported_python(version)
    assert "Slicer 5.10 or newer" in refusal and f"Python {version[0]}.{version[1]}" in refusal
    assert _one_sentence(refusal)


@pytest.mark.parametrize("version", [(3, 10, 0), (3, 12, 10), (3, 13, 0), tuple(sys.version_info)])
def test_python_3_10_and_newer_is_accepted(version):
    assert dependencies.unsupported_python(version) is None


def test_dependencies_imports_on_python_3_9_and_refuses_to_install():
    """The widget imports this file first, so Slicer 5.8 must get the sentence, not a SyntaxError."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 on this machine")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from SlicerMed3DVLMLib import dependencies, demo_notice\n"
            "print(dependencies.unsupported_python())\n"
            "try:\n    dependencies.install(['torch>=2.2,<3'])\n"
            "except dependencies.InstallError as error:\n    print(error)\n")
    run = subprocess.run([python, "-c", code, str(ROOT / "SlicerMed3DVLM")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    refusal, install_refusal = run.stdout.strip().splitlines()
    assert "Slicer 5.10 or newer" in refusal and "Python 3.9" in refusal
    assert install_refusal == refusal  # no dialog, no pip: nothing installed could make it work


def test_pins_fit_slicer_and_the_demo_model():
    requirements = {Requirement(text).name: Requirement(text) for text in dependencies.REQUIREMENTS}
    # Slicer 5.10 bundles pydicom 2.4.4 for its DICOM module: installing must not replace it.
    assert requirements["pydicom"].specifier.contains("2.4.4")
    # transformers 4.57.6 (the last 4.x) cannot read the demo tokenizer; 5.0.0 can (measured).
    assert not requirements["transformers"].specifier.contains("4.57.6")
    assert requirements["transformers"].specifier.contains("5.0.0")
    # the HTTP client in Slicer, and the model server run with Slicer's own Python
    assert {"h11", "fastapi", "uvicorn"} <= set(requirements)


def test_pins_of_pydicom_and_transformers_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {Requirement(text).name: text.replace(" ", "") for text in pyproject["project"]["dependencies"]}
    ours = {Requirement(text).name: text for text in dependencies.REQUIREMENTS}
    assert pinned["pydicom"] == ours["pydicom"] and pinned["transformers"] == ours["transformers"]


def test_failure_reason_is_short_and_names_no_command_line():
    with pytest.raises(subprocess.CalledProcessError) as caught:
        subprocess.run([sys.executable, "-c", "raise SystemExit(3)"], check=True, capture_output=True)
    reason = dependencies.failure_reason(caught.value)
    assert "exit status 3" in reason and sys.executable not in reason
    assert dependencies.failure_reason(OSError("No space left on device\nmore lines")) == "No space left on device"
    assert dependencies.failure_reason(RuntimeError()) == "RuntimeError"
    assert len(dependencies.failure_reason(ValueError("x" * 1000))) == 200


# ----- install() with slicer.util and PyTorchUtils standing in for the Slicer application -------------
def _fail_like_a_subprocess():
    subprocess.run([sys.executable, "-c", "raise SystemExit(1)"], check=True, capture_output=True)


@pytest.fixture
def slicer_app(monkeypatch):
    """``slicer.util`` with a confirmation that says yes and a pip_install that succeeds."""
    calls = []
    util = types.SimpleNamespace(confirmOkCancelDisplay=lambda *args, **kwargs: True,
                                 pip_install=lambda requirements: calls.append(requirements))
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(util=util))
    return types.SimpleNamespace(util=util, pip_calls=calls)


def _torch_installer(monkeypatch, install_torch):
    logic = type("PyTorchUtilsLogic", (), {"installTorch": lambda self, **kwargs: install_torch()})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=logic))


def test_failed_pytorch_install_is_one_sentence(slicer_app, monkeypatch):
    _torch_installer(monkeypatch, _fail_like_a_subprocess)  # light-the-torch exits with an error
    with pytest.raises(InstallError) as caught:
        dependencies.install(["torch>=2.2,<3", "nibabel>=5.0"])
    assert _one_sentence(str(caught.value)) and "PyTorch could not be installed" in str(caught.value)
    assert slicer_app.pip_calls == []  # stopped at the first failure


def test_missing_pytorch_extension_is_one_sentence(slicer_app, monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import raises ImportError
    with pytest.raises(InstallError, match="'PyTorch' extension") as caught:
        dependencies.install(["torch>=2.2,<3"])
    assert _one_sentence(str(caught.value))


def test_failed_pip_install_is_one_sentence(slicer_app):
    slicer_app.util.pip_install = lambda requirements: _fail_like_a_subprocess()
    with pytest.raises(InstallError) as caught:
        dependencies.install(["nibabel>=5.0"])
    assert _one_sentence(str(caught.value)) and "exit status 1" in str(caught.value)


def test_declined_install_is_one_sentence(slicer_app):
    slicer_app.util.confirmOkCancelDisplay = lambda *args, **kwargs: False
    with pytest.raises(InstallError, match="press Install") as caught:
        dependencies.install(["nibabel>=5.0"])
    assert _one_sentence(str(caught.value)) and slicer_app.pip_calls == []


def test_successful_install_checks_again(slicer_app, monkeypatch):
    _torch_installer(monkeypatch, lambda: sys.modules.get("torch") or __import__("torch"))
    dependencies.install(["torch>=2.2,<3", "nibabel>=5.0"])  # this environment has them all afterwards
    assert slicer_app.pip_calls == [["nibabel>=5.0"]]


# ----- ExtensionsIndex rules (Slicer/ExtensionsIndex scripts/check_description_files.py) -------------
def test_extension_name_and_license_pass_the_extensions_index_checks():
    import json
    import re

    (catalog,) = [p for p in ROOT.glob("*.json")]  # the entry submitted to ExtensionsIndex
    name = catalog.stem
    assert not name.lower().startswith("slicer")  # check_extension_name
    assert json.loads(catalog.read_text())["scm_url"].rsplit("/", 1)[-1].startswith("Slicer")  # the repository
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.findall(r"project\s*\(\s*([^\s)]+)", cmake, re.IGNORECASE)[0] == name  # check_cmakelists_content
    assert "Slicer 5.10 or newer" in re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', cmake).group(1)
    license_text = (ROOT / "LICENSE").read_text()  # check_license_file; pyproject says Apache-2.0
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
