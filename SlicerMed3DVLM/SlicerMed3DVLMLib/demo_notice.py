"""The one-time notice that the bundled demo model knows only synthetic phantoms.

The demo model was trained on the project's CT and MRI phantoms, so what it writes about a real
scan is fluent but meaningless. Users are told once, before it first reports on a volume that is
not a phantom; the answer is remembered in the application settings (``store``: anything with
``value(key, default)`` and ``setValue(key, value)``, a QSettings in Slicer).
"""

from __future__ import annotations

SHOWN_KEY = "Med3DVLM/demoNoticeShown"
NOTICE = ("The bundled demo model was trained only on synthetic phantoms, never on patient scans: what it "
          "writes about a real scan is not a finding. For real images choose a released Med3DVLM model "
          "folder in the settings.")


def is_phantom(volume_name: str) -> bool:
    """The bundled samples and the self-test's volumes are named after what they are."""
    return "phantom" in volume_name.lower()


def was_shown(store) -> bool:
    # INI-backed QSettings hands back "true"/"false" strings, the registry and PySide real bools
    return str(store.value(SHOWN_KEY, False)).strip().lower() in ("true", "1")


def should_warn(store, model: str, volume_name: str) -> bool:
    """True the first time the demo model is about to work on a volume that is not a phantom."""
    return model == "demo" and not is_phantom(volume_name) and not was_shown(store)


def mark_warned(store) -> None:
    store.setValue(SHOWN_KEY, True)
