"""The Slicer module's logic on real MRML (slicer-core) against a real model server process (the
stand-in model behind the package's own server, on loopback): volume conversion, streaming into
text nodes, abnormality score tables, stop, busy, scene save/reload, bad inputs, a server that
dies, a remote server with a token, clean shutdown."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest
from med3dvlm.errors import Med3DVLMError, ModelError, VolumeError
from med3dvlm.client import tasks
from med3dvlm.client.transport import run
from med3dvlm.wire import CHUNK
from server_process import standin_command, start_server
from vtkmodules.util.numpy_support import vtk_to_numpy

from SlicerMed3DVLMLib import score_table, server_link, text_nodes
from SlicerMed3DVLMLib.logic import BusyError, Med3DVLMLogic
from SlicerMed3DVLMLib.settings import Settings
from SlicerMed3DVLMLib.volume_node import (NodeVolume, modality_and_sequence, node_metadata, read_volume_node,
                                           volume_from_node)

# An LPS-style scan: i runs right-to-left, j anterior-to-posterior, k foot-to-head, slightly oblique.
ANGLE = np.deg2rad(10)
LPS_OBLIQUE = np.array([
    [-0.8 * np.cos(ANGLE), 0.9 * np.sin(ANGLE), 0.0, 101.5],
    [-0.8 * np.sin(ANGLE), -0.9 * np.cos(ANGLE), 0.0, 80.25],
    [0.0, 0.0, 2.5, -40.0],
    [0.0, 0.0, 0.0, 1.0],
])


def coded_array(shape=(6, 5, 4)) -> np.ndarray:
    i, j, k = np.indices(shape)
    return (100 * i + 10 * j + k).astype(np.int16)  # the value says where the voxel is


class Recorder:
    """Collects a request's callbacks, noting the thread each one ran on."""

    def __init__(self, logic: Med3DVLMLogic | None = None, stop_after: int | None = None) -> None:
        self.logic, self.stop_after = logic, stop_after
        self.tokens: list[str] = []
        self.node_texts: list[str] = []
        self.statuses = []
        self.result = None
        self.threads: set[str] = set()
        self.node = None

    def on_token(self, piece: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.tokens.append(piece)
        if self.node is not None:
            self.node_texts.append(self.node.GetText())
        if self.stop_after is not None and len(self.tokens) == self.stop_after:
            self.logic.cancel()

    def on_status(self, status) -> None:
        self.statuses.append(status)

    def on_done(self, result) -> None:
        self.threads.add(threading.current_thread().name)
        self.result = result

    def callbacks(self) -> dict:
        return {"on_token": self.on_token, "on_done": self.on_done, "on_status": self.on_status}


@pytest.fixture
def make_logic(scene):
    made = []

    def make(target_scene=None, store=None, **standin):
        """A logic whose local server is the stand-in model with ``standin`` options."""
        logic = Med3DVLMLogic(target_scene or scene, store=store, server_command=standin_command(**standin))
        made.append(logic)
        return logic

    yield make
    for logic in made:
        assert logic.shutdown(timeout=5)


def server_info(logic) -> dict:
    return run(tasks.info(logic.local_server.poll()))


# ----- volume node -> Volume ---------------------------------------------------------------------
def test_volume_keeps_voxel_order_and_oblique_lps_matrix(make_volume):
    array = coded_array()
    volume = volume_from_node(make_volume(array, LPS_OBLIQUE))
    assert volume.shape == (6, 5, 4)
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (3, 2, 1), (5, 4, 3)]:
        assert volume.array[i, j, k] == 100 * i + 10 * j + k
    np.testing.assert_allclose(volume.affine, LPS_OBLIQUE, atol=1e-9)
    assert volume.orientation[0] in "LR" and volume.spacing == pytest.approx((0.8, 0.9, 2.5))


def test_volume_from_nifti_matches_nibabel(scene, tmp_path):
    """MRML's own NIfTI reader, then our conversion, gives nibabel's voxels and affine."""
    data = coded_array((7, 6, 5)).astype(np.float32)
    affine = np.array([[-0.7, 0, 0, 12.0], [0, -0.8, 0, -3.5], [0, 0, 1.5, 40.0], [0, 0, 0, 1]])
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    volume = volume_from_node(read_volume_node(scene, str(path)))
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.orientation == "LPS"


def test_linear_parent_transform_is_applied(scene, make_volume):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    node = make_volume(coded_array(), LPS_OBLIQUE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    shift.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    expected = LPS_OBLIQUE.copy()
    expected[:3, 3] += [5.0, 0.0, -7.0]
    np.testing.assert_allclose(volume_from_node(node).affine, expected, atol=1e-9)


@pytest.mark.parametrize("make_case, message", [
    (lambda mk: None, "No volume is selected"),
    (lambda mk: mk(np.ones((8, 6, 1))), "2D image"),
    (lambda mk: mk(np.ones((4, 4, 4, 3))), "3 values per voxel"),
    (lambda mk: mk(np.ones((4, 4, 4)), node_class="vtkMRMLLabelMapVolumeNode"), "not an image volume"),
])
def test_unusable_volumes_get_one_clear_sentence(make_volume, make_case, message):
    with pytest.raises(VolumeError, match=message):
        volume_from_node(make_case(make_volume))


def test_modality_from_name_attributes_and_dicom(scene, make_volume):
    def guess(name, attributes=(), dicom=None):
        node = make_volume(np.ones((4, 4, 4)), name=name)
        for key, value in attributes:
            node.SetAttribute(key, value)
        lookup = (lambda uid, tag: dicom.get(tag, "")) if dicom else None
        return modality_and_sequence(node, node_metadata(node, lookup))

    assert guess("CT chest") == ("CT", None)
    assert guess("MRBrainTumor1") == ("MR", None)
    assert guess("AX T2 FLAIR") == ("MR", "FLAIR")
    assert guess("scan") == ("unknown", None)
    assert guess("scan", [("Med3DVLM.modality", "MRI"), ("Med3DVLM.sequence", "t2")]) == ("MR", "T2")
    dicom = {"0008,0060": "MR", "0008,103E": "AX T1 POST GAD"}
    assert guess("series 5", [("DICOM.instanceUIDs", "1.2.3 1.2.4")], dicom) == ("MR", "T1C")


# ----- requests --------------------------------------------------------------------------------
def test_report_streams_into_text_node_on_main_thread(qtbot, make_logic, make_volume):
    logic, volume = make_logic(token_delay=0.01), make_volume(coded_array())
    recorder = Recorder()
    recorder.node = logic.generate_report(volume, **recorder.callbacks())
    assert logic.busy
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=5000)

    text = recorder.result.text
    assert text.startswith("CT 6x5x4") and len(text.split()) == 24
    assert "".join(recorder.tokens) == text
    assert recorder.threads == {threading.main_thread().name}
    partial = [t for t in recorder.node_texts if t and t != text]
    assert partial and all(text.startswith(t) for t in partial)  # the node grew while streaming
    node = recorder.node
    assert node.GetText() == text and node.GetAttribute(text_nodes.STATUS) == "complete"
    assert node.GetNodeReferenceID(text_nodes.REPORT_ROLE) == volume.GetID()
    stages = [s.stage for s in recorder.statuses]
    assert stages[0] == "starting" and stages.index("encoding") < stages.index("generating")
    assert recorder.statuses[-1].stage == "done" and recorder.statuses[-1].tokens == 24
    assert logic.model_is_loaded and not logic.busy


def test_blocking_calls_send_the_volume_once_and_keep_history(make_logic, make_volume):
    logic, volume = make_logic(), make_volume(coded_array())
    report = logic.generate_report(volume)
    server = logic.local_server.process
    assert logic.ask(volume, "Is the liver normal?") == "Answer #1: Is the liver normal?"
    assert logic.ask(volume.GetID(), "  And the spleen? ") == "Answer #2: And the spleen?"
    assert server_info(logic)["uploads"] == 1 and logic.local_server.process is server  # one server, reused
    conversation = text_nodes.active_conversation(logic.scene, volume)
    turns = text_nodes.get_turns(conversation)
    assert [t.role for t in turns] == ["user", "model"] * 2
    assert "**You**" in conversation.GetText() and "Answer #2" in conversation.GetText()
    assert [t.text for t in logic.session_turns(volume)][:2] == ["Generate a report", report]


def test_stop_keeps_the_partial_answer(qtbot, make_logic, make_volume):
    logic, volume = make_logic(token_delay=0.02), make_volume(coded_array())
    recorder = Recorder(logic, stop_after=3)
    node = logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=5000)
    result = recorder.result
    assert result.stopped and 3 <= len(result.text.split()) < 24
    assert node.GetText() == result.text and node.GetAttribute(text_nodes.STATUS) == "stopped"
    assert text_nodes.get_turns(node)[-1].note == "stopped"
    assert recorder.statuses[-1].stage == "stopped"


def test_stop_while_the_model_loads_leaves_nothing_behind(qtbot, make_logic, make_volume):
    logic, volume = make_logic(load_delay=2), make_volume(coded_array())
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: "loading" in [s.stage for s in recorder.statuses], timeout=10000)
    assert logic.cancel()
    # the stop comes back through the server process: with two evaluations beside the suite on 2 cores
    # it once took over 5 s
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=15000)
    assert recorder.result.stopped and recorder.result.text == "" and recorder.tokens == []
    assert logic.records(volume) == [] and not logic.cancel()


def test_second_request_while_busy_is_refused(qtbot, make_logic, make_volume):
    logic, volume = make_logic(token_delay=0.01), make_volume(coded_array())
    first = Recorder()
    logic.generate_report(volume, **first.callbacks())
    with pytest.raises(BusyError, match="still working on the report"):
        logic.ask(volume, "Anything else?")
    assert text_nodes.active_conversation(logic.scene, volume) is None  # the refused one left nothing
    qtbot.waitUntil(lambda: first.result is not None, timeout=5000)
    assert logic.ask(volume, "Anything else?").startswith("Answer #1")


# ----- a large volume: read in place, hashed and sent a chunk a tick ---------------------------------------
def edit_voxels(node, add: int) -> None:
    """What a Slicer module does to a volume: change its voxels in place, then mark them modified."""
    scalars = node.GetImageData().GetPointData().GetScalars()
    vtk_to_numpy(scalars)[:] += add
    scalars.Modified()


@pytest.fixture
def checks(monkeypatch) -> list[int]:
    """Counts the module's checks of a node's state (one before each chunk hashed or sent); one
    step of the request's task a tick, so that a test can act between two chunks, as Slicer may."""
    counted, real = [], NodeVolume.check
    monkeypatch.setattr(NodeVolume, "check", lambda self: counted.append(1) or real(self))
    monkeypatch.setattr(server_link, "TICK_BUDGET", 0.0)
    return counted


def test_a_volume_edited_while_it_is_sent_is_sent_again_never_stale(qtbot, make_logic, make_volume, checks):
    logic, array = make_logic(), coded_array((256, 256, 64))  # 8 MB: 8 chunks
    volume, chunks = make_volume(array), array.nbytes // CHUNK
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: len(checks) >= chunks + 2, timeout=20000)  # hashed, and the upload under way
    assert len(checks) < 2 * chunks and recorder.result is None
    edit_voxels(volume, 1000)  # between two ticks
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=20000)
    assert recorder.result.error is None
    assert f"mean={float(array.mean()) + 1000:.1f}" in recorder.result.text  # the model saw the edited voxels
    info = server_info(logic)
    assert (info["uploads"], info["volumes"]) == (1, 1)  # the cut-off upload of the stale voxels left nothing
    assert "Traceback" not in logic.local_server.log_text()


def test_a_volume_that_keeps_changing_is_refused_with_a_sentence(qtbot, make_logic, make_volume, checks):
    logic, array = make_logic(), coded_array((256, 256, 64))
    volume = make_volume(array)
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: len(checks) >= 2, timeout=20000)
    while recorder.result is None:  # a module (or a live stream) changing the volume at every tick
        edit_voxels(volume, 1)
        qtbot.wait(20)
    assert recorder.result.error == ("The volume kept changing while it was being sent to the model server; "
                                     "ask again once it has stopped changing.")
    assert logic.records(volume) == [] and not logic.busy and server_info(logic)["uploads"] == 0


def test_tokens_that_came_during_a_stall_are_shown_in_one_update(make_logic, make_volume):
    """While Slicer's main thread is busy elsewhere tokens pile up; the next tick writes them to the
    text node and the panel once, not once a token, so that tick stays short."""
    logic, volume = make_logic(token_delay=0.002, report_words=400), make_volume(coded_array())
    recorder = Recorder()
    recorder.node = logic.generate_report(volume, **recorder.callbacks())
    while not recorder.tokens:
        logic._link.pump()
        time.sleep(0.005)
    time.sleep(0.4)  # a stall: no tick
    before = len(recorder.tokens)
    logic._link.pump()  # one tick
    assert len(recorder.tokens) == before + 1 and len(recorder.tokens[-1].split()) >= 10
    assert recorder.node.GetText().endswith(recorder.tokens[-1])
    logic.cancel()


def test_report_and_conversation_survive_saving_and_reloading(tmp_path, scene, make_logic, make_volume):
    from slicer import vtkMRMLScene

    logic, volume = make_logic(), make_volume(coded_array(), LPS_OBLIQUE, name="CT liver")
    report = logic.generate_report(volume)
    logic.ask(volume, "Is there a cyst?")
    (saved_node,) = text_nodes.records(scene, volume, text_nodes.REPORT_ROLE)
    saved = text_nodes.provenance(saved_node)
    assert scene.SaveSceneToSlicerDataBundleDirectory(str(tmp_path))
    mrml = next(tmp_path.glob("*.mrml"))

    reloaded = vtkMRMLScene()
    reloaded.SetURL(str(mrml))
    assert reloaded.Import()
    volume2 = reloaded.GetFirstNodeByName("CT liver")
    np.testing.assert_array_equal(volume_from_node(volume2).array, coded_array())
    (report_node,) = text_nodes.records(reloaded, volume2, text_nodes.REPORT_ROLE)
    assert report_node.GetText() == report
    made = text_nodes.provenance(report_node)  # how the report was made, kept with the scene
    assert (made["task"], made["model"], made["generation"]["max_new_tokens"]) == ("report", "stand-in", 256)
    assert made == saved and made["preprocessing"]["volumes"] == [{"output_shape": list(coded_array().shape)}]
    conversation = text_nodes.active_conversation(reloaded, volume2)
    assert [t.text for t in text_nodes.get_turns(conversation)] == ["Is there a cyst?", "Answer #1: Is there a cyst?"]

    logic2 = make_logic(reloaded)  # the conversation goes on where it stopped
    assert logic2.ask(volume2, "How big?") == "Answer #2: How big?"
    assert len(logic2.session_turns(volume2)) == 6


def test_missing_model_folder_is_a_clear_error_and_leaves_no_node(qtbot, make_logic, make_volume, tmp_path):
    logic, volume = make_logic(), make_volume(coded_array())
    missing = tmp_path / "no-such-model"
    logic.update_settings(model=str(missing))
    with pytest.raises(Med3DVLMError, match="does not exist"):
        logic.generate_report(volume)
    recorder = Recorder()
    logic.ask(volume, "Hello?", **recorder.callbacks())
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=5000)
    assert str(missing) in recorder.result.error and recorder.statuses[-1].stage == "failed"
    assert logic.records(volume) == []


def test_question_must_not_be_empty(make_logic, make_volume):
    logic, volume = make_logic(), make_volume(coded_array())
    with pytest.raises(Med3DVLMError, match="question is empty"):
        logic.ask(volume, "   ")


MR_SCORES = {("liver", "cyst"): 0.12, ("spleen", "mass"): 0.91, ("left kidney", "cyst"): 0.55}
SCORE_COLUMNS = ["organ", "abnormality", "probability", "threshold", "above threshold"]


def cells(table) -> list[tuple[str, ...]]:
    """A table node's cells as text, as Slicer's Tables module shows them."""
    return [tuple(table.GetCellText(r, c) for c in range(table.GetNumberOfColumns()))
            for r in range(table.GetNumberOfRows())]


def tables(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLTableNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def test_detection_not_available_or_recorded(scene, make_logic, make_volume):
    logic, volume = make_logic(), make_volume(coded_array(), name="MR T2 abdomen")
    with pytest.raises(Med3DVLMError, match="has no MRI abnormality detector"):
        logic.detect(volume)
    assert logic.records(volume) == [] and tables(scene) == []
    scored = make_logic(scores={("liver", "mass"): 0.91, ("left kidney", "cyst"): 0.12})
    assert scored.detect(volume) == {"mass in the liver": 0.91, "cyst in the left kidney": 0.12}
    (findings,) = scored.records(volume, text_nodes.FINDINGS_ROLE)
    assert findings.GetText() == "mass in the liver: 0.91\ncyst in the left kidney: 0.12"


def test_scores_are_one_sorted_table_per_volume_replaced_on_rerun(scene, make_logic, make_volume):
    mr, other = make_volume(coded_array(), name="MR T2 abdomen"), make_volume(coded_array(), name="T1 pelvis")
    make_logic(scores=MR_SCORES).detect(mr)
    (table,) = tables(scene)
    assert table.GetName() == "MR T2 abdomen abnormality scores"
    assert table.GetNodeReferenceID(score_table.SCORES_ROLE) == mr.GetID()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == SCORE_COLUMNS
    assert cells(table) == [("spleen", "mass", "0.91", "0.5", "1"), ("left kidney", "cyst", "0.55", "0.5", "1"),
                            ("liver", "cyst", "0.12", "0.5", "0")]

    make_logic(scores={("liver", "cyst"): 0.7, ("spleen", "mass"): 0.2}).detect(mr)  # another model, same volume
    assert tables(scene) == [table]  # the same node refilled: views showing it follow
    assert cells(table) == [("liver", "cyst", "0.7", "0.5", "1"), ("spleen", "mass", "0.2", "0.5", "0")]

    make_logic(scores=MR_SCORES).detect(other)
    assert len(tables(scene)) == 2
    assert [r.organ for r in score_table.read_scores(score_table.find_table(scene, other)).rows] == [
        "spleen", "left kidney", "liver"]
    assert [r.organ for r in score_table.read_scores(table).rows] == ["liver", "spleen"]


def test_failed_detection_keeps_the_earlier_scores(make_logic, make_volume):
    mr = make_volume(coded_array(), name="MR T2 abdomen")
    make_logic(scores=MR_SCORES).detect(mr)
    logic = make_logic()  # a model without a detector
    before = logic.abnormality_scores(mr)
    with pytest.raises(Med3DVLMError, match="has no MRI abnormality detector"):
        logic.detect(mr)
    assert logic.abnormality_scores(mr) == before and len(before.rows) == 3


def test_score_table_survives_saving_and_reloading(tmp_path, scene, make_logic, make_volume):
    from slicer import vtkMRMLScene

    volume = make_volume(coded_array(), LPS_OBLIQUE, name="MR T2 abdomen")
    make_logic(scores=MR_SCORES).detect(volume)
    saved = make_logic().abnormality_scores(volume)
    assert scene.SaveSceneToSlicerDataBundleDirectory(str(tmp_path))

    reloaded = vtkMRMLScene()
    reloaded.SetURL(str(next(tmp_path.glob("*.mrml"))))
    assert reloaded.Import()
    volume2 = reloaded.GetFirstNodeByName("MR T2 abdomen")
    logic2 = make_logic(reloaded, scores={("liver", "cyst"): 0.3})
    assert logic2.abnormality_scores(volume2) == saved  # rows, types, sequence and model all kept
    (table,) = tables(reloaded)
    assert text_nodes.provenance(table)["task"] == "detect" and text_nodes.provenance(table)["seconds"] >= 0
    assert saved.sequences == ["T2"] and saved.model == "demo"
    assert [r.probability for r in saved.rows] == [0.91, 0.55, 0.12] and [r.above for r in saved.rows] == [
        True, True, False]

    logic2.detect(volume2)  # a new run after reloading replaces the reloaded table
    (table,) = tables(reloaded)
    assert cells(table) == [("liver", "cyst", "0.3", "0.5", "0")]


# ----- lifetime ---------------------------------------------------------------------------------
def test_closing_the_scene_stops_generation(qtbot, scene, make_logic, make_volume):
    logic, volume = make_logic(token_delay=0.02), make_volume(coded_array())
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: len(recorder.tokens) > 0, timeout=5000)
    start = time.monotonic()
    scene.Clear(0)
    qtbot.waitUntil(lambda: not logic.busy, timeout=2000)
    assert time.monotonic() - start < 0.5  # stopped within a token, not after the 24 of them
    assert recorder.result.stopped
    assert scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 0


def test_shutdown_during_generation_stops_the_server(qtbot, make_logic, make_volume):
    logic, volume = make_logic(token_delay=0.02), make_volume(coded_array())
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: len(recorder.tokens) > 0, timeout=5000)
    process = logic.local_server.process
    assert logic.shutdown(timeout=2)
    assert process.poll() is not None and not logic.busy


def test_a_server_that_dies_mid_answer_keeps_what_arrived_and_restarts(qtbot, make_logic, make_volume):
    logic, volume = make_logic(die_after=5, token_delay=0.01), make_volume(coded_array())
    recorder = Recorder()
    node = logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=10000)
    result = recorder.result
    assert result.restart and result.error.startswith("The model server stopped (exit code 3)")
    assert result.error.endswith("press Restart to start it again.") and result.error.count(".") == 1
    assert len(node.GetText().split()) == 5 and node.GetText() == "".join(recorder.tokens)  # what arrived is kept
    assert node.GetAttribute(text_nodes.STATUS) == "failed" and not logic.busy
    logic.restart_server()
    assert logic.ask(volume, "Hi?") == "Answer #1: Hi?"  # 3 tokens: the fresh server survives them


def test_changed_settings_restart_the_local_server(qtbot, make_logic, make_volume, tmp_path):
    logic, volume = make_logic(token_delay=0.02), make_volume(coded_array())
    logic.ask(volume, "One?")
    first = logic.local_server.process
    assert logic.model_is_loaded and logic.loaded_model == "stand-in (cpu, float32)"
    logic.update_settings(max_new_tokens=10)  # generation only: the server stays
    assert logic.local_server.process is first and logic.model_is_loaded
    recorder = Recorder()
    logic.generate_report(volume, **recorder.callbacks())
    qtbot.waitUntil(lambda: len(recorder.tokens) > 0, timeout=5000)
    logic.update_settings(model=str(tmp_path))  # another model: a new server, after this answer
    qtbot.waitUntil(lambda: recorder.result is not None, timeout=5000)
    assert recorder.result.error is None and len(recorder.result.text.split()) == 10
    assert not logic.model_is_loaded
    qtbot.waitUntil(lambda: first.poll() is not None, timeout=5000)  # told to stop; Slicer does not wait for it
    logic.ask(volume, "Two?")
    assert logic.local_server.process is not first


def test_a_remote_server_needs_its_token_which_is_never_stored(tmp_path, make_logic, make_volume):
    from qtpy.QtCore import QSettings

    token = "remote-test-token-0123456789abcdef"
    remote = start_server(tmp_path / "remote", "--host", "0.0.0.0", token=token)
    try:
        store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
        logic, volume = make_logic(store=store), make_volume(coded_array())
        logic.set_server_token(None)
        logic.update_settings(server=remote.url.replace("0.0.0.0", "127.0.0.1"))
        with pytest.raises(Med3DVLMError, match="needs its access token"):
            logic.ask(volume, "Hello?")
        logic.set_server_token(token)
        assert logic.ask(volume, "Hello?") == "Answer #1: Hello?"
        assert logic.local_server.process is None  # nothing started on this computer
        assert logic.loaded_model.startswith("stand-in (cpu, float32) at 127.0.0.1:")
        store.sync()
        assert token not in (tmp_path / "settings.ini").read_text()
        assert all(token not in (n.GetText() or "") for n in logic.records(volume))
    finally:
        remote.stop()


def test_settings_persist_in_the_store(tmp_path, make_logic):
    from qtpy.QtCore import QSettings

    store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    make_logic(store=store).update_settings(model="/models/med3dvlm", device="cpu", max_new_tokens="128",
                                           temperature=0.7, quantization="4bit")
    store.sync()
    reread = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    settings = make_logic(store=reread).settings
    assert (settings.model, settings.device, settings.max_new_tokens, settings.temperature) == \
        ("/models/med3dvlm", "cpu", 128, 0.7)
    assert settings.load_arguments() == {"model": "/models/med3dvlm", "device": "cpu", "dtype": "auto",
                                         "quantization": "4bit"}
    assert Settings().load_arguments()["quantization"] is None  # the default loads unquantized
    assert settings.generation() == {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7}
    with pytest.raises(ValueError, match="must start with http"):
        make_logic().update_settings(server="gpu-box:8000")
    reread.setValue("Med3DVLM/device", "quantum")  # a bad hand-edited value falls back to the default
    assert make_logic(store=reread).settings.device == "auto"
    with pytest.raises(ValueError, match="device must be one of"):
        make_logic().update_settings(device="gpu0")
    with pytest.raises(ValueError, match="quantization must be one of"):
        make_logic().update_settings(quantization="2bit")


def test_node_from_volume_round_trip(scene):
    from med3dvlm.volume import Volume

    from SlicerMed3DVLMLib.volume_node import node_from_volume

    original = Volume(coded_array(), LPS_OBLIQUE, modality="MR", sequence="FLAIR", source="brain")
    back = volume_from_node(node_from_volume(scene, original))
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-9)
    assert (back.modality, back.sequence, back.source) == ("MR", "FLAIR", "brain")


# ----- packaging ---------------------------------------------------------------------------------
def test_extension_metadata_and_module_files_agree():
    """The ExtensionsIndex entry, the CMake metadata and the module's file list stay in step."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    entry = json.loads((root / "Med3DVLM.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    cmake = (root / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert f'set(EXTENSION_HOMEPAGE "{entry["scm_url"]}")' in cmake
    assert re.search(r'EXTENSION_DEPENDS "([^"]*)"', cmake).group(1).split() == entry["build_dependencies"]
    module = root / "SlicerMed3DVLM"
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", (module / "CMakeLists.txt").read_text()))
    assert listed == {p.name for p in (module / "SlicerMed3DVLMLib").glob("*.py")}
    from qtpy.QtGui import QImage

    icon = QImage(str(module / "Resources" / "Icons" / "SlicerMed3DVLM.png"))
    assert (icon.width(), icon.height()) == (128, 128)


def test_first_use_requirements_match_pyproject():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from SlicerMed3DVLMLib import dependencies

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pinned = {req.replace(" ", "") for req in pyproject["project"]["dependencies"]}
    ours = set(dependencies.REQUIREMENTS) | {"torch" + dependencies.TORCH_REQUIREMENT}
    assert ours <= pinned and pinned - ours <= {"numpy>=1.24"}  # Slicer ships numpy
    assert dependencies.missing_requirements() == []  # this environment has them all
