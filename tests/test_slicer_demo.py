"""The Slicer module with the real demo model: a sample volume read by MRML's own reader, a report
and a follow-up question streamed into the panel and into text nodes, saved with the scene; MRI
abnormality scores from the demo detector in a table node and in the panel."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QSettings, Qt

from med3dvlm.detection import Detector
from med3dvlm.readers import read_volume
from med3dvlm.resources import demo_detector_dir, sample_path
from SlicerMed3DVLMLib import score_table, text_nodes
from SlicerMed3DVLMLib.chat_panel import ChatPanel
from SlicerMed3DVLMLib.controller import ChatController
from SlicerMed3DVLMLib.logic import Med3DVLMLogic
from SlicerMed3DVLMLib.volume_node import read_volume_node, volume_from_node

SAMPLE = sample_path("ct_phantom.nii.gz")
MR_SAMPLE = sample_path("mr_phantom_t2.nii.gz")


@pytest.fixture
def demo_logic(scene, tmp_path):
    logic = Med3DVLMLogic(scene, store=QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat))
    logic.update_settings(model="demo", device="cpu")
    yield logic
    assert logic.shutdown(timeout=10)


def test_node_read_by_mrml_gives_the_same_model_input_as_the_file(scene):
    node = read_volume_node(scene, str(SAMPLE))
    from_node, from_file = volume_from_node(node), read_volume(SAMPLE)
    # Same voxels in the same world positions, so the model sees the same scan.
    world = lambda v, ijk: (v.affine @ np.array([*ijk, 1.0]))[:3]  # noqa: E731
    np.testing.assert_allclose(world(from_node, (10, 20, 5)), world(from_file, (10, 20, 5)), atol=1e-3)
    np.testing.assert_array_equal(from_node.array, from_file.array)


def test_demo_report_and_question_stream_into_text_nodes(qtbot, scene, demo_logic, tmp_path):
    from slicer import vtkMRMLScene

    node = read_volume_node(scene, str(SAMPLE), name="CT sample")
    tokens: list[str] = []
    done, statuses = [], []
    report_node = demo_logic.generate_report(node, on_token=tokens.append, on_done=done.append,
                                             on_status=statuses.append)
    qtbot.waitUntil(lambda: bool(done), timeout=120_000)
    report = done[0].text
    assert done[0].error is None and statuses[-1].tokens > 3 and "".join(tokens).strip() == report
    assert "Findings" in report
    assert report_node.GetText() == report

    answer = demo_logic.ask(node, "How many abnormalities are there?")
    assert answer.strip()
    (tmp_path / "bundle").mkdir()
    assert scene.SaveSceneToSlicerDataBundleDirectory(str(tmp_path / "bundle"))
    reloaded = vtkMRMLScene()
    reloaded.SetURL(str(next((tmp_path / "bundle").glob("*.mrml"))))
    assert reloaded.Import()
    volume = reloaded.GetFirstNodeByName("CT sample")
    (saved_report,) = text_nodes.records(reloaded, volume, text_nodes.REPORT_ROLE)
    assert saved_report.GetText() == report
    turns = text_nodes.get_turns(text_nodes.active_conversation(reloaded, volume))
    assert [t.text for t in turns] == ["How many abnormalities are there?", answer]


def test_quantized_demo_answers_in_slicer(qtbot, scene, demo_logic):
    """The Quantization setting reaches the loader: the LM runs on bitsandbytes 8-bit layers."""
    pytest.importorskip("bitsandbytes")
    node = read_volume_node(scene, str(SAMPLE), name="CT sample")
    demo_logic.update_settings(quantization="8bit")
    done = []
    demo_logic.ask(node, "How many abnormalities are there?", on_done=done.append)
    qtbot.waitUntil(lambda: bool(done), timeout=120_000)
    assert done[0].error is None and done[0].text.strip()
    assert demo_logic.loaded_model == "demo (cpu, float32, LM 8bit)"


def test_panel_with_demo_model(qtbot, scene, demo_logic):
    read_volume_node(scene, str(SAMPLE), name="CT sample")
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, demo_logic)
    qtbot.mouseClick(panel.report_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not demo_logic.busy, timeout=120_000)
    qtbot.keyClicks(panel.question_box, "What abnormalities are present?")
    qtbot.keyClick(panel.question_box, Qt.Key_Return)
    qtbot.waitUntil(lambda: not demo_logic.busy, timeout=60_000)
    text = panel.view.toPlainText()
    assert "What abnormalities are present?" in text
    assert panel.status_label.text().startswith("Done")
    assert "demo" in panel.model_label.text()


def test_demo_detector_scores_the_mr_sample_into_a_table_and_the_panel(qtbot, scene, demo_logic):
    node = read_volume_node(scene, str(MR_SAMPLE))  # named mr_phantom_t2: MR, T2 sequence
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, demo_logic)
    qtbot.mouseClick(panel.detect_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not demo_logic.busy, timeout=120_000)
    assert panel.status_label.text() == "Done: abnormality scores ready."

    detector = Detector.load(demo_detector_dir())
    expected = detector.detect(read_volume(MR_SAMPLE))  # what `med3dvlm detect` reports for the file
    table = score_table.find_table(scene, node)
    assert table.GetName() == "mr_phantom_t2 abnormality scores"
    stored = score_table.read_scores(table)
    assert len(stored.rows) == len(detector.labels) == 23  # one row per abnormality the detector knows
    assert {(r.organ, r.abnormality) for r in stored.rows} == set(detector.labels)
    probabilities = [r.probability for r in stored.rows]
    assert probabilities == sorted(probabilities, reverse=True)
    np.testing.assert_allclose(probabilities, [s.probability for s in expected.scores], atol=1e-5)
    assert [r.above for r in stored.rows] == [s.positive for s in expected.scores]
    assert stored.sequences == ["T2"] and stored.model == "demo"

    table_view = panel.scores_table
    assert not table_view.isHidden() and table_view.rowCount() == 23
    first = [table_view.item(0, c).text() for c in range(table_view.columnCount())]
    top = stored.rows[0]
    assert first[:3] == [top.organ, top.abnormality, f"{top.probability:.2f}"]
