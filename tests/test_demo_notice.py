"""The one-time warning that the demo model knows only phantoms, kept in real QSettings files."""

from __future__ import annotations

from qtpy.QtCore import QSettings

from SlicerMed3DVLMLib import demo_notice


def _store(path):
    return QSettings(str(path), QSettings.IniFormat)


def test_warns_once_before_the_demo_meets_a_real_scan(tmp_path):
    store = _store(tmp_path / "settings.ini")
    assert not demo_notice.should_warn(store, "demo", "ct_phantom")  # the bundled samples need no warning
    assert not demo_notice.should_warn(store, "/models/Med3DVLM-Qwen-2.5-7B", "CT chest")  # a real model
    assert demo_notice.should_warn(store, "demo", "CT chest")
    demo_notice.mark_warned(store)
    assert not demo_notice.should_warn(store, "demo", "CT chest")
    store.sync()
    # remembered across Slicer sessions: a new settings object on the same file (values read back as strings)
    assert not demo_notice.should_warn(_store(tmp_path / "settings.ini"), "demo", "MR brain")


def test_the_notice_names_phantoms_on_one_line():
    assert "phantoms" in demo_notice.NOTICE and demo_notice.NOTICE.endswith(".") and "\n" not in demo_notice.NOTICE
