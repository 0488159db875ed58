"""Show evidence, the model's view and region questions in the Slicer module, on real MRML (a scene
set up as Slicer sets up its own) against a real model server process with the demo model on
loopback: what the module shows equals what the pipeline makes in this process, lies exactly over
the scan (also under a parent transform), and is saved with the scene and reloaded."""

from __future__ import annotations

import re

import numpy as np
import pytest
from qtpy.QtCore import QSettings, Qt
from qtpy.QtGui import QTextCursor
from vtkmodules.vtkCommonMath import vtkMatrix4x4

import med3dvlm
from med3dvlm.resources import sample_path
from server_process import start_server
from SlicerMed3DVLMLib import evidence_nodes, score_table, text_nodes
from SlicerMed3DVLMLib.chat_panel import ChatPanel
from SlicerMed3DVLMLib.controller import ChatController
from SlicerMed3DVLMLib.logic import Med3DVLMLogic
from SlicerMed3DVLMLib.overlays import OVERLAY
from SlicerMed3DVLMLib.volume_node import ijk_to_ras, read_volume_node, volume_from_node

CT, MR = str(sample_path("ct_phantom.nii.gz")), str(sample_path("mr_phantom_t2.nii.gz"))
SAMPLES = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    process = start_server(tmp_path_factory.mktemp("slicer-evidence"), "--device", "cpu", "--threads", "1",
                           standin=False)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local():
    return med3dvlm.load("demo", device="cpu")


@pytest.fixture
def make_logic(served, tmp_path):
    made = []

    def make(scene):
        """A logic asking the demo server (loopback, as the module's own would be)."""
        logic = Med3DVLMLogic(scene, store=QSettings(str(tmp_path / f"settings{len(made)}.ini"), QSettings.IniFormat))
        logic.update_settings(server=served.url, evidence_samples=SAMPLES)
        made.append(logic)
        return logic

    yield make
    for logic in made:
        assert logic.shutdown(timeout=5)


def moved_scan(scene, path: str, name: str):
    """The sample read by MRML's reader, under a linear transform (turned 20 degrees about S and
    shifted), as a registered scan would be."""
    scan = read_volume_node(scene, path, name)
    angle = np.deg2rad(20)
    matrix = vtkMatrix4x4()
    for row, values in enumerate([[np.cos(angle), -np.sin(angle), 0, 12.5], [np.sin(angle), np.cos(angle), 0, -7.0],
                                  [0, 0, 1, 30.0]]):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, value)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(matrix)
    scan.SetAndObserveTransformNodeID(transform.GetID())
    return scan


def place_roi(scene, centre, size, name="R"):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    return roi


def voxel_centre(scan, ijk) -> list[float]:
    return (ijk_to_ras(scan) @ np.array([*ijk, 1.0]))[:3].tolist()


def box_corners(world: np.ndarray, box_voxels) -> np.ndarray:
    """The 8 world corners of the voxel edges around [start, stop) along i, j, k."""
    (i0, i1), (j0, j1), (k0, k1) = box_voxels
    edges = np.array([[i, j, k, 1.0] for i in (i0 - 0.5, i1 - 0.5) for j in (j0 - 0.5, j1 - 0.5)
                      for k in (k0 - 0.5, k1 - 0.5)])
    return (world @ edges.T)[:3].T


def roi_corners(roi) -> np.ndarray:
    matrix = roi.GetObjectToWorldMatrix()  # through the ROI's parent transform
    to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    half = np.array(roi.GetSize()) / 2
    corners = np.array([[x, y, z, 1.0] for x in (-half[0], half[0]) for y in (-half[1], half[1])
                        for z in (-half[2], half[2])])
    return (to_world @ corners.T)[:3].T


def same_corners(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(sorted(map(tuple, a.round(6)))), np.array(sorted(map(tuple, b.round(6)))),
                               atol=1e-4)


def reload(scene, folder, make_scene):
    folder.mkdir()
    assert scene.SaveSceneToSlicerDataBundleDirectory(str(folder))
    reloaded = make_scene()
    reloaded.SetURL(str(next(folder.glob("*.mrml"))))
    assert reloaded.Import()
    return reloaded


def assert_same_map(map_node, expected) -> None:
    shown = volume_from_node(map_node)
    np.testing.assert_allclose(shown.affine, expected.affine, atol=1e-6)
    peak = np.abs(expected.array).max()  # the server runs torch on one thread: sums in another order
    np.testing.assert_allclose(shown.array, expected.array, rtol=1e-3, atol=1e-3 * peak)


def assert_same_in_world(shown, expected) -> None:
    """The same voxels at the same world positions. MRML's reader may store a volume whose axes are
    left-handed (the model's input often is) with one axis reversed: the same volume in space."""
    mapping = np.linalg.inv(shown.affine) @ expected.affine
    ijk = np.indices(expected.shape).reshape(3, -1)
    position = mapping[:3, :3] @ ijk + mapping[:3, 3:]
    index = np.rint(position).astype(int)
    np.testing.assert_allclose(position, index, atol=1e-4)  # voxel centres on voxel centres
    np.testing.assert_array_equal(shown.array[tuple(index)], expected.array.reshape(-1))


def foregrounds(scene) -> set:
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return {(c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
            for c in (composites.GetItemAsObject(i) for i in range(composites.GetNumberOfItems()))}


def test_evidence_of_an_answer_lies_over_the_scan_and_is_kept_with_the_scene(slicer_scene, make_logic, local,
                                                                             tmp_path):
    scene = slicer_scene()
    scan = moved_scan(scene, CT, "CT sample")
    logic = make_logic(scene)
    question = "Which organ has a cyst?"
    answer = logic.ask(scan, question)
    conversation = text_nodes.active_conversation(scene, scan)
    key = text_nodes.get_turns(conversation)[-1].time
    assert logic.explainable_answers(scan) == {key}

    shown = logic.show_evidence(scan, key)
    assert shown.GetName() == f"CT sample evidence: {answer}" and shown.GetAttribute(OVERLAY) == "evidence"
    assert evidence_nodes.find_evidence(conversation, key) is shown  # referenced from the conversation
    assert shown.GetParentTransformNode() is scan.GetParentTransformNode()  # it moves with the scan
    expected = local.explain(volume_from_node(scan), question, answer, samples=SAMPLES).map
    assert_same_map(shown, expected)
    np.testing.assert_allclose(ijk_to_ras(shown), ijk_to_ras(scan), atol=1e-9)  # voxel on voxel
    display = shown.GetDisplayNode()
    support = expected.array[expected.array > 0]
    low, high = np.percentile(support, evidence_nodes.TOP_PERCENTILES)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(low, rel=1e-2)
    assert display.GetWindow() == pytest.approx(high - low, rel=2e-2)
    assert display.GetColorNode().GetName() == evidence_nodes.COLOURS
    assert foregrounds(scene) == {(scan.GetID(), shown.GetID(), evidence_nodes.OPACITY)}
    provenance = text_nodes.provenance(shown)
    assert provenance["task"] == "explain" and provenance["model"] == "demo"

    done = []
    assert logic.show_evidence(scan, key, on_done=done.append) is shown  # shown again: no request
    assert not logic.busy and done[0].node_id == shown.GetID()

    reloaded = reload(scene, tmp_path / "bundle", slicer_scene)
    scan2 = reloaded.GetFirstNodeByName("CT sample")
    conversation2 = text_nodes.active_conversation(reloaded, scan2)
    shown2 = evidence_nodes.find_evidence(conversation2, key)
    assert shown2 is not None and shown2.GetName() == shown.GetName()
    assert_same_map(shown2, expected)
    assert shown2.GetDisplayNode().GetApplyThreshold() and shown2.GetDisplayNode().GetColorNode() is not None
    assert foregrounds(reloaded) == {(scan2.GetID(), shown2.GetID(), evidence_nodes.OPACITY)}
    logic2 = make_logic(reloaded)
    assert logic2.show_evidence(scan2, key) is shown2 and not logic2.busy  # kept, not made again


def test_a_region_question_and_its_evidence_are_about_the_box(slicer_scene, make_logic, local, tmp_path):
    scene = slicer_scene()
    scan = moved_scan(scene, CT, "CT sample")
    roi = place_roi(scene, voxel_centre(scan, (80, 90, 24)), (150, 140, 100))
    region = roi_region(roi)
    logic = make_logic(scene)
    question = "Which organ has a cyst?"
    answer = logic.ask(scan, question, region=roi)
    assert answer == local.ask(volume_from_node(scan), question, region=region)
    conversation = text_nodes.active_conversation(scene, scan)
    turn = text_nodes.get_turns(conversation)[-1]
    assert turn.region == region and turn.framing.startswith("region R ")
    assert text_nodes.provenance(conversation)["preprocessing"]["volumes"][0]["region"]["ras"] == region

    shown = logic.show_evidence(scan, turn.time)
    expected = local.explain(volume_from_node(scan), question, answer, region=region, samples=SAMPLES).map
    assert_same_map(shown, expected)
    assert not volume_from_node(shown).array[~_near(volume_from_node(scan), region)].any()  # nothing outside it

    reloaded = reload(scene, tmp_path / "bundle", slicer_scene)
    scan2 = reloaded.GetFirstNodeByName("CT sample")
    (turn2,) = [t for t in text_nodes.get_turns(text_nodes.active_conversation(reloaded, scan2)) if t.role == "model"]
    assert turn2.region == region and turn2.text == answer
    roi2 = reloaded.GetFirstNodeByName("R")
    np.testing.assert_allclose(_bounds(roi2), _bounds(roi))


def test_the_model_view_and_its_box_lie_exactly_over_the_scan(slicer_scene, make_logic, local, tmp_path):
    scene = slicer_scene()
    scan = moved_scan(scene, CT, "CT sample")
    roi = place_roi(scene, voxel_centre(scan, (70, 80, 20)), (160, 150, 120))
    logic = make_logic(scene)
    view = logic.show_model_view(scan, region=roi)
    (box,) = [n for n in _nodes(scene, "vtkMRMLMarkupsROINode") if n.GetAttribute(OVERLAY) == "model input box"]
    here = local.model_view(volume_from_node(scan), roi_region(roi))
    np.testing.assert_array_equal(volume_from_node(view).array, here.volume.array)
    np.testing.assert_allclose(ijk_to_ras(view), here.volume.affine, atol=1e-6)
    assert view.GetDisplayNode().GetWindow() == pytest.approx(1.0) and view.GetDisplayNode().GetLevel() == 0.5
    assert foregrounds(scene) == {(scan.GetID(), view.GetID(), 1.0)}

    scan_box = box_corners(ijk_to_ras(scan), here.box_voxels)  # the scan's voxels the model was shown
    same_corners(roi_corners(box), scan_box)  # the ROI lies exactly on them
    same_corners(box_corners(ijk_to_ras(view), [[0, n] for n in view.GetImageData().GetDimensions()]), scan_box)

    reloaded = reload(scene, tmp_path / "bundle", slicer_scene)
    box2 = reloaded.GetFirstNodeByName(box.GetName())
    same_corners(roi_corners(box2), box_corners(ijk_to_ras(reloaded.GetFirstNodeByName("CT sample")), here.box_voxels))
    assert_same_in_world(volume_from_node(reloaded.GetFirstNodeByName(view.GetName())), here.volume)


def test_evidence_of_a_score_is_referenced_from_the_score_table(slicer_scene, make_logic, local):
    scene = slicer_scene()
    scan = read_volume_node(scene, MR, "mr_phantom_t2")
    logic = make_logic(scene)
    logic.detect(scan)
    table = score_table.find_table(scene, scan)
    top = score_table.read_scores(table).rows[0]
    label = f"{top.abnormality} in the {top.organ}"
    shown = logic.show_score_evidence(scan, label)
    assert evidence_nodes.find_evidence(table, label) is shown
    assert shown.GetName() == f"mr_phantom_t2 evidence: {label}"
    (expected,) = local.explain_detection(volume_from_node(scan), label, samples=SAMPLES).values()
    assert_same_map(shown, expected.map)


def _bounds(roi) -> list[float]:
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    return bounds


def roi_region(roi) -> list[list[float]]:
    """The ROI's world box as the module sends it: two opposite corners."""
    bounds = _bounds(roi)
    return [bounds[0::2], bounds[1::2]]


def _nodes(scene, class_name: str) -> list:
    nodes = scene.GetNodesByClass(class_name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def _near(volume, region, margin=10.0) -> np.ndarray:
    """The voxels of the box of stored indices around the region's 8 corners, ``margin`` mm wider
    (an oblique scan is cropped along its own axes)."""
    low, high = np.min(region, axis=0), np.max(region, axis=0)
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    ijk = (np.linalg.inv(volume.affine) @ corners.T)[:3]
    wider = margin / np.linalg.norm(volume.affine[:3, :3], axis=0) + 1e-6
    start, stop = np.ceil(ijk.min(axis=1) - wider), np.floor(ijk.max(axis=1) + wider) + 1
    inside = np.zeros(volume.shape, bool)
    inside[tuple(slice(int(max(a, 0)), int(b)) for a, b in zip(start, stop))] = True
    return inside


# ----- the panel (real Qt: PySide6 offscreen) -------------------------------------------------------
@pytest.fixture
def panel_on(qtbot, make_logic):
    def make(scene):
        """(panel, logic) on ``scene``, as the module's widget builds them (plain combos for selectors)."""
        logic = make_logic(scene)
        panel = ChatPanel()
        qtbot.addWidget(panel)
        panel.show()
        ChatController(panel, logic)
        return panel, logic
    return make


def choose(combo, node) -> None:
    combo.setCurrentIndex(combo.findData(node.GetID() if node is not None else ""))


def click_link(qtbot, panel, text: str) -> None:
    """Follow the chat's last link by keyboard, as a user can: Shift+Tab from the end, then Enter."""
    panel.view.setFocus()
    panel.view.moveCursor(QTextCursor.End)
    qtbot.keyClick(panel.view, Qt.Key_Backtab)
    assert panel.view.textCursor().selectedText() == text
    qtbot.keyClick(panel.view, Qt.Key_Return)


def test_the_panel_shows_evidence_from_an_answer_and_the_models_view(qtbot, slicer_scene, panel_on):
    scene = slicer_scene()
    scan = read_volume_node(scene, CT, "CT sample")
    scan.CreateDefaultDisplayNodes()
    scan.GetDisplayNode().AutoWindowLevelOff()
    scan.GetDisplayNode().SetWindowLevel(300, 60)  # what the user set in the slice views
    panel, logic = panel_on(scene)
    panel.window_check.setChecked(True)
    qtbot.keyClicks(panel.question_box, "Which organ has a cyst?")
    qtbot.keyClick(panel.question_box, Qt.Key_Return)
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    shown = panel.view.toPlainText()
    assert "window L60/W300" in shown and shown.count("Show evidence") == 1  # on the answer, not the question
    assert "Note" in shown and "trained with the fixed CT window" in shown  # and the server's warning

    click_link(qtbot, panel, "Show evidence")
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    assert "the window L60/W300 shows it intensities" in panel.status_label.text()  # the answer's window, again
    (made,) = [n for n in _nodes(scene, "vtkMRMLScalarVolumeNode") if n.GetAttribute(OVERLAY) == "evidence"]
    assert foregrounds(scene) == {(scan.GetID(), made.GetID(), evidence_nodes.OPACITY)}
    click_link(qtbot, panel, "Show evidence")  # again: the same map, at once
    assert panel.status_label.text() == f"Shown again over the scan: {made.GetName()}." and not logic.busy

    panel.window_check.setChecked(False)
    qtbot.mouseClick(panel.model_view_button, Qt.LeftButton)
    assert not panel.model_view_button.isEnabled()  # busy: the work runs in the server, not here
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    assert panel.status_label.text() == "Done: the model's input and its box are shown over the scan."
    (view,) = [n for n in _nodes(scene, "vtkMRMLScalarVolumeNode") if n.GetAttribute(OVERLAY) == "model view"]
    assert foregrounds(scene) == {(scan.GetID(), view.GetID(), 1.0)}
    assert text_nodes.provenance(view)["preprocessing"]["volumes"][0]["window"] == [40.0, 400.0]  # the model's


def test_the_panel_shows_the_evidence_of_a_selected_score(qtbot, slicer_scene, panel_on):
    scene = slicer_scene()
    scan = read_volume_node(scene, MR, "mr_phantom_t2")
    panel, logic = panel_on(scene)
    qtbot.mouseClick(panel.detect_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    qtbot.mouseClick(panel.score_evidence_button, Qt.LeftButton)
    assert panel.status_label.text() == "Select a score in the table first, then press Show evidence."
    panel.scores_table.selectRow(1)
    qtbot.mouseClick(panel.score_evidence_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    row = score_table.read_scores(score_table.find_table(scene, scan)).rows[1]
    (made,) = [n for n in _nodes(scene, "vtkMRMLScalarVolumeNode") if n.GetAttribute(OVERLAY) == "evidence"]
    assert made.GetName() == f"mr_phantom_t2 evidence: {row.abnormality} in the {row.organ}"


@pytest.mark.parametrize("roi, sentence", [
    (None, r"^The region 'R' is empty \(it has not been placed, or has no size\); place it over the scan in a "
           r"slice view and drag its handles open\.$"),
    (((0, 0, 0), (0, 40, 40)), r"^The region 'R' is empty \(it has not been placed, or has no size\);"),
    (((900, 900, 900), (50, 50, 50)), r"^The region \(R 875 to 925, .*\) lies outside volume \w+, which spans .* mm\.$"),
    (((0, 0, 0), (6, 6, 6)), r"^The region is too small for the model's 32 x 128 x 128 input, .*; draw a larger box\.$"),
])
def test_a_region_the_model_cannot_use_is_one_sentence_in_the_panel(qtbot, slicer_scene, panel_on, roi, sentence):
    scene = slicer_scene()
    scan = read_volume_node(scene, CT, "CT sample")
    if roi is None:
        region = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")  # made, never placed
    else:
        offset = np.array(voxel_centre(scan, (80, 80, 24))) * (np.abs(roi[0]) < 500)  # inside, or far outside
        region = place_roi(scene, np.array(roi[0]) + offset, roi[1])
    panel, logic = panel_on(scene)
    choose(panel.region_selector, region)
    qtbot.mouseClick(panel.report_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not logic.busy, timeout=60_000)
    message = panel.status_label.text()
    assert re.match(sentence, message) and "\n" not in message
    assert panel.view.toPlainText().endswith(message) and "Error" in panel.view.toPlainText()  # in the chat too
    assert not text_nodes.records(scene, scan)  # nothing half-made is left in the scene
