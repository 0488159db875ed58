"""The chat panel on real Qt (PySide6, offscreen) driven through the controller and the logic on
real MRML: keys, streaming into the view and into text nodes, Stop, busy, bad input, transcript."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QSettings, Qt
from qtpy.QtWidgets import QApplication
from server_process import standin_command

from SlicerMed3DVLMLib import text_nodes
from SlicerMed3DVLMLib.chat_panel import ChatPanel, markdown_to_html
from SlicerMed3DVLMLib.controller import ChatController
from SlicerMed3DVLMLib.logic import Med3DVLMLogic


@pytest.fixture
def chat(qtbot, scene, make_volume, tmp_path):
    """(panel, logic) with one CT volume loaded and selected; the stand-in model streams slowly
    enough (10 ms a token) to be caught mid-answer."""
    volume = make_volume(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), name="CT abdomen")
    store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    logic = Med3DVLMLogic(scene, server_command=standin_command(token_delay=0.01), store=store)
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, logic)
    assert panel.selected_volume_id() == volume.GetID()
    yield panel, logic
    assert logic.shutdown(timeout=5)


def view_text(panel: ChatPanel) -> str:
    return panel.view.toPlainText()


def wait_idle(qtbot, logic) -> None:
    qtbot.waitUntil(lambda: not logic.busy, timeout=5000)


def test_markdown_is_rendered_and_escaped():
    html = markdown_to_html("## Findings\n- **liver**: *small* cyst\n- `code`\n\n1. one\n<script>x</script>")
    assert "<b>Findings</b>" in html and "<ul><li><b>liver</b>: <i>small</i> cyst</li>" in html
    assert "<code>code</code></li></ul><ol><li>one</li></ol>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_enter_sends_shift_enter_breaks_line_up_recalls(qtbot):
    panel = ChatPanel()
    qtbot.addWidget(panel)
    sent = []
    panel.on_send = sent.append
    box = panel.question_box
    qtbot.keyClicks(box, "first line")
    qtbot.keyClick(box, Qt.Key_Return, Qt.ShiftModifier)
    qtbot.keyClicks(box, "second")
    assert sent == [] and box.toPlainText() == "first line\nsecond"
    qtbot.keyClick(box, Qt.Key_Return)
    assert sent == ["first line\nsecond"] and box.toPlainText() == ""
    qtbot.keyClicks(box, "another")
    qtbot.keyClick(box, Qt.Key_Enter)
    qtbot.keyClick(box, Qt.Key_Up)
    assert box.toPlainText() == "another"
    qtbot.keyClick(box, Qt.Key_Up)
    assert box.toPlainText() == "first line\nsecond"
    qtbot.keyClick(box, Qt.Key_Down)
    qtbot.keyClick(box, Qt.Key_Down)
    assert box.toPlainText() == ""


def test_report_and_two_questions_stream_into_panel_and_scene(qtbot, chat):
    panel, logic = chat
    qtbot.mouseClick(panel.report_button, Qt.LeftButton)
    assert not panel.report_button.isEnabled() and panel.stop_button.isEnabled()
    qtbot.waitUntil(lambda: "mean=" in view_text(panel), timeout=5000)
    assert logic.busy and "tokens" in panel.status_label.text()  # caught mid-stream
    wait_idle(qtbot, logic)
    report = logic.records(panel.selected_volume_id(), text_nodes.REPORT_ROLE)[0].GetText()
    assert report in view_text(panel) and panel.status_label.text().startswith("Done: 24 tokens")
    assert panel.model_label.text().startswith("Model: stand-in")

    for question in ("Is the liver normal?", "And the spleen?"):
        qtbot.keyClicks(panel.question_box, question)
        qtbot.keyClick(panel.question_box, Qt.Key_Return)
        wait_idle(qtbot, logic)
    text = view_text(panel)
    assert text.index(report) < text.index("Answer #1: Is the liver normal?") < text.index("Answer #2: And the spleen?")
    conversation = text_nodes.active_conversation(logic.scene, logic.scene.GetNodeByID(panel.selected_volume_id()))
    assert "Answer #2: And the spleen?" in conversation.GetText()


def test_stop_button_ends_the_answer_and_marks_it(qtbot, chat):
    panel, logic = chat
    panel.on_report()
    qtbot.waitUntil(lambda: "mean=" in view_text(panel), timeout=5000)
    qtbot.mouseClick(panel.stop_button, Qt.LeftButton)
    wait_idle(qtbot, logic)
    assert "stopped" in view_text(panel) and panel.status_label.text().startswith("Stopped after")
    assert panel.report_button.isEnabled() and not panel.stop_button.isEnabled()
    (node,) = logic.records(panel.selected_volume_id())
    assert node.GetAttribute(text_nodes.STATUS) == "stopped" and len(node.GetText().split()) < 24


def test_request_while_busy_shows_why(qtbot, chat):
    panel, logic = chat
    panel.on_report()
    assert not panel.send_button.isEnabled()
    panel.on_send("Too early?")  # what a console or a second window could still do
    assert "still working on the report" in view_text(panel)
    qtbot.waitUntil(lambda: "kidneys" in view_text(panel), timeout=5000)
    text = view_text(panel)  # the message went in above the answer, which kept streaming below
    assert text.index("Error") < text.rindex("Med3DVLM") < text.index("kidneys")
    wait_idle(qtbot, logic)
    assert "Too early?" not in view_text(panel)


def test_bad_inputs_show_a_sentence_not_a_traceback(qtbot, chat, make_volume, tmp_path):
    panel, logic = chat
    flat = make_volume(np.ones((8, 6, 1)), name="scout")
    panel.volume_selector.setCurrentIndex(panel.volume_selector.findData(flat.GetID()))
    panel.on_report()
    assert "is a 2D image" in view_text(panel) and not logic.busy

    panel.volume_selector.setCurrentIndex(-1)
    panel.on_send("Anything?")
    assert "No volume is selected" in view_text(panel)

    panel.volume_selector.setCurrentIndex(0)
    missing = tmp_path / "missing-model"
    panel.set_settings_values({**panel.settings_values(), "model": str(missing)})
    panel.on_apply_settings(panel.settings_values())
    assert "loads on first use" in panel.model_label.text()
    panel.on_report()
    wait_idle(qtbot, logic)
    assert f"Model folder {missing} does not exist" in view_text(panel)
    assert "Traceback" not in view_text(panel) and panel.report_button.isEnabled()


def test_clear_hides_the_chat_but_keeps_the_records(qtbot, chat):
    panel, logic = chat
    panel.on_send("Is the liver normal?")
    wait_idle(qtbot, logic)
    qtbot.mouseClick(panel.clear_button, Qt.LeftButton)
    assert view_text(panel).strip() == ""
    volume = panel.selected_volume_id()
    assert logic.session_turns(volume) == [] and len(logic.records(volume)) == 1
    panel.on_send("New topic?")
    wait_idle(qtbot, logic)
    assert "Answer #1: New topic?" in view_text(panel)  # a fresh conversation: no old history


def test_each_volume_shows_its_own_conversation(qtbot, chat, make_volume):
    panel, logic = chat
    second = make_volume(np.ones((5, 5, 5)), name="MR brain")
    question = "About the first? " + " ".join(f"w{i}" for i in range(30))  # a 33-token answer
    panel.on_send(question)
    qtbot.waitUntil(lambda: "Answer #1:" in view_text(panel), timeout=5000)
    panel.volume_selector.setCurrentIndex(panel.volume_selector.findData(second.GetID()))
    assert "About the first?" not in view_text(panel)
    panel.volume_selector.setCurrentIndex(0)  # back while the answer still streams
    assert logic.busy and "Answer #1:" in view_text(panel)
    wait_idle(qtbot, logic)
    assert f"Answer #1: {question}" in view_text(panel)
    panel.volume_selector.setCurrentIndex(1)
    panel.on_send("About the second?")
    wait_idle(qtbot, logic)
    panel.volume_selector.setCurrentIndex(0)
    assert "About the first?" in view_text(panel) and "About the second?" not in view_text(panel)


def test_transcript_copy_and_save(qtbot, chat, tmp_path):
    panel, logic = chat
    panel.on_send("Is the liver normal?")
    wait_idle(qtbot, logic)
    panel.copy_transcript()
    copied = QApplication.clipboard().text()
    assert "# Med3DVLM conversation — CT abdomen" in copied and "**Med3DVLM**" in copied
    path = tmp_path / "chat.md"
    panel.save_transcript(str(path))
    assert path.read_text(encoding="utf-8") == copied
    assert "Is the liver normal?" in copied and "Answer #1: Is the liver normal?" in copied


def test_settings_panel_round_trip(chat):
    panel, logic = chat
    values = {"model": "demo", "device": "cpu", "dtype": "float32", "quantization": "4bit", "max_new_tokens": 64,
              "temperature": 0.3, "server": "https://gpu.lab.example/med3dvlm", "evidence_samples": 16}
    panel.set_settings_values(values)
    panel.token_edit.setText("secret-token-of-the-lab-server")
    panel.on_apply_settings(panel.settings_values())
    assert logic.settings.device == "cpu" and logic.settings.max_new_tokens == 64
    assert logic.settings.load_arguments()["quantization"] == "4bit"
    assert logic.settings.server == "https://gpu.lab.example/med3dvlm" and logic.has_server_token
    assert "secret" not in repr(logic.settings)  # the token is not a setting
    assert logic.settings.temperature == pytest.approx(0.3) and logic.settings.evidence_samples == 16
    assert panel.settings_values() == {**values, "token": "secret-token-of-the-lab-server"}
    assert panel.model_label.text() == "Model: on https://gpu.lab.example/med3dvlm (connects on first use)"


def shown_scores(panel: ChatPanel) -> list[tuple[str, ...]]:
    table = panel.scores_table
    return [tuple(table.item(r, c).text() for c in range(table.columnCount())) for r in range(table.rowCount())]


def test_detect_button_shows_sorted_scores_for_mri_volumes(qtbot, scene, make_volume, tmp_path):
    ct = make_volume(np.arange(120, dtype=np.int16).reshape(6, 5, 4), name="CT abdomen")
    mr = make_volume(np.arange(120, dtype=np.int16).reshape(6, 5, 4) + 1, name="MR T2 abdomen")
    scores = {("liver", "cyst"): 0.12, ("spleen", "mass"): 0.91, ("left kidney", "cyst"): 0.55}
    store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    logic = Med3DVLMLogic(scene, server_command=standin_command(scores=scores), store=store)
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, logic)

    def select(node) -> None:
        panel.volume_selector.setCurrentIndex(panel.volume_selector.findData(node.GetID()))

    select(mr)
    assert panel.scores_table.isHidden()  # nothing detected yet

    qtbot.mouseClick(panel.detect_button, Qt.LeftButton)
    wait_idle(qtbot, logic)
    assert not panel.scores_table.isHidden()
    assert shown_scores(panel) == [("spleen", "mass", "0.91", "0.50", "yes"),
                                   ("left kidney", "cyst", "0.55", "0.50", "yes"),
                                   ("liver", "cyst", "0.12", "0.50", "")]
    assert panel.scores_label.text() == "2 of 3 above threshold (T2, model demo)"
    assert "Detect abnormalities" in view_text(panel) and panel.status_label.text().startswith("Done")

    select(ct)  # a CT volume has no scores, and asking for them says why
    assert panel.scores_table.isHidden()
    qtbot.mouseClick(panel.detect_button, Qt.LeftButton)
    wait_idle(qtbot, logic)
    assert "detection needs MRI" in view_text(panel) and panel.scores_table.isHidden()

    select(mr)  # read back from the scene's table node
    assert shown_scores(panel)[0] == ("spleen", "mass", "0.91", "0.50", "yes")
    assert logic.shutdown(timeout=5)


def test_a_label_the_detector_does_not_call_on_the_sequence_says_so(qtbot, scene, make_volume, tmp_path):
    mr = make_volume(np.arange(120, dtype=np.int16).reshape(6, 5, 4), name="MR T2 abdomen")
    scores = {("spleen", "mass"): 0.91, ("right lung", "calcification"): [0.97, None], ("liver", "cyst"): 0.12}
    store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    logic = Med3DVLMLogic(scene, server_command=standin_command(scores=scores), store=store)
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, logic)
    panel.volume_selector.setCurrentIndex(panel.volume_selector.findData(mr.GetID()))
    qtbot.mouseClick(panel.detect_button, Qt.LeftButton)
    wait_idle(qtbot, logic)
    # a high probability the detector cannot call on T2 alone is shown, and not as a finding
    assert shown_scores(panel) == [("right lung", "calcification", "0.97", "not called", ""),
                                   ("spleen", "mass", "0.91", "0.50", "yes"), ("liver", "cyst", "0.12", "0.50", "")]
    assert panel.scores_label.text() == "1 of 3 above threshold; 1 not called on these sequences (T2, model demo)"
    assert logic.abnormality_scores(mr).rows[0].called is False  # kept so in the scene's table (NaN threshold)
    assert "calcification in the right lung: 0.97 (not called on these sequences)" in view_text(panel)
    assert logic.shutdown(timeout=5)



def test_a_server_that_dies_mid_answer_shows_a_sentence_and_restart(qtbot, scene, make_volume, tmp_path):
    volume = make_volume(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), name="CT abdomen")
    store = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    logic = Med3DVLMLogic(scene, server_command=standin_command(die_after=5, token_delay=0.01), store=store)
    panel = ChatPanel()
    qtbot.addWidget(panel)
    ChatController(panel, logic)
    assert panel.restart_button.isHidden()
    qtbot.mouseClick(panel.report_button, Qt.LeftButton)
    wait_idle(qtbot, logic)
    errors = [t.text for t in panel.turns if t.role == "error"]
    assert len(errors) == 1 and errors[0].startswith("The model server stopped (exit code 3)")
    assert not panel.restart_button.isHidden() and panel.report_button.isEnabled()
    (report,) = text_nodes.records(scene, volume, text_nodes.REPORT_ROLE)
    assert len(report.GetText().split()) == 5  # what arrived before the crash is kept
    qtbot.mouseClick(panel.restart_button, Qt.LeftButton)
    assert panel.restart_button.isHidden() and "Starting the model server again" in panel.status_label.text()
    panel.on_send("Still there?")
    qtbot.waitUntil(lambda: "Answer #1: Still there?" in view_text(panel), timeout=10000)
    assert logic.shutdown(timeout=5)
