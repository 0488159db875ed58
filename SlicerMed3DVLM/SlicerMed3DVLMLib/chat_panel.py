"""The chat panel: conversation view, abnormality scores, question box, buttons, status line and
settings. No MRML.

User actions reach the owner through plain callbacks (``on_send(question)``, ``on_report()``,
``on_detect()``, ``on_stop()``, ``on_clear()``, ``on_volume_changed()``,
``on_apply_settings(values)``, ``on_evidence(answer_time)``, ``on_score_evidence(label)``,
``on_model_view()``) because PythonQt cannot declare Python signals. The volume and region
selectors are whatever widgets the owner passes (qMRMLNodeComboBoxes in Slicer); without them the
panel makes plain combos filled by :meth:`ChatPanel.set_volume_choices` and
:meth:`ChatPanel.set_region_choices`. Each answer that can be explained carries a Show evidence
link (``evidence:<its time>``), handled here rather than followed by the browser.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

from .qtcompat import (
    QAbstractItemView, QApplication, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
    QHeaderView, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, Qt, QTableWidget,
    QTableWidgetItem, QTextBrowser, QTextCursor, QVBoxLayout, QWidget, prop,
)
from .settings import DEVICES, PRECISIONS, QUANTIZATIONS
from .transcript import Turn, now, transcript_markdown

COLORS = {"user": "#1c71d8", "model": "#26a269", "error": "#c01c28", "warning": "#c64600"}
EVIDENCE_LINK = "evidence:"  # + the answer's time
SCORE_HEADERS = ("Organ", "Abnormality", "Probability", "Threshold", "Above")


def _inline(text: str) -> str:
    """Escaped text with `code`, **bold** and *italic*."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", text)


def markdown_to_html(text: str) -> str:
    """The little Markdown a model writes: headings, bullet and numbered lists, paragraphs."""
    out: list[str] = []
    list_tag = ""
    for line in text.split("\n"):
        stripped = line.strip()
        bullet = re.match(r"[-*•]\s+(.*)", stripped)
        number = re.match(r"\d+[.)]\s+(.*)", stripped)
        tag = "ul" if bullet else "ol" if number else ""
        if tag != list_tag:
            out.append(f"</{list_tag}>" if list_tag else "")
            out.append(f"<{tag}>" if tag else "")
            list_tag = tag
        if bullet or number:
            out.append(f"<li>{_inline((bullet or number).group(1))}</li>")
        elif heading := re.match(r"(#{1,6})\s+(.*)", stripped):
            out.append(f"<p><b>{_inline(heading.group(2))}</b></p>")
        elif stripped:
            out.append(f"<p>{_inline(stripped)}</p>")
    if list_tag:
        out.append(f"</{list_tag}>")
    return "".join(out)


def _turn_html(turn: Turn, body: str, explainable: bool = False) -> str:
    note = "".join(f" — {html.escape(text)}" for text in (turn.note, turn.framing) if text)
    link = f' &nbsp;<a href="{EVIDENCE_LINK}{html.escape(turn.time)}">Show evidence</a>' if explainable else ""
    return (f'<p style="margin-top:10px; margin-bottom:2px"><b style="color:{COLORS.get(turn.role, "#000")}">'
            f'{html.escape(turn.title)}</b> <span style="color:#888888">{turn.clock}{note}</span>{link}</p>'
            f'<div style="margin-left:10px">{body}</div>')


class QuestionBox(QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line, Up/Down walk through earlier questions."""

    def __init__(self, submit: Callable[[], None], parent=None) -> None:
        QPlainTextEdit.__init__(self, parent)
        self._submit = submit
        self.history: list[str] = []
        self._position = 0  # index into history; len(history) = the question being typed

    def remember(self, question: str) -> None:
        if not self.history or self.history[-1] != question:
            self.history.append(question)
        self._position = len(self.history)

    def _recall(self, step: int) -> None:
        self._position = max(0, min(len(self.history), self._position + step))
        self.setPlainText(self.history[self._position] if self._position < len(self.history) else "")
        self.moveCursor(QTextCursor.End)

    def keyPressEvent(self, event) -> None:
        key, shift = event.key(), bool(event.modifiers() & Qt.ShiftModifier)
        cursor = self.textCursor()
        if key in (Qt.Key_Return, Qt.Key_Enter):
            if shift:
                self.insertPlainText("\n")
            else:
                self._submit()
        elif key == Qt.Key_Up and self.history and cursor.blockNumber() == 0:
            self._recall(-1)
        elif key == Qt.Key_Down and cursor.blockNumber() == prop(self, "blockCount") - 1 \
                and self._position < len(self.history):
            self._recall(+1)
        else:
            QPlainTextEdit.keyPressEvent(self, event)


class ChatPanel(QWidget):
    def __init__(self, parent=None, volume_selector=None, region_selector=None) -> None:
        QWidget.__init__(self, parent)
        self.on_send: Callable[[str], None] | None = None
        self.on_report: Callable[[], None] | None = None
        self.on_detect: Callable[[], None] | None = None
        self.on_stop: Callable[[], None] | None = None
        self.on_clear: Callable[[], None] | None = None
        self.on_volume_changed: Callable[[], None] | None = None
        self.on_apply_settings: Callable[[dict], None] | None = None
        self.on_restart: Callable[[], None] | None = None
        self.on_evidence: Callable[[str], None] | None = None
        self.on_score_evidence: Callable[[str], None] | None = None
        self.on_model_view: Callable[[], None] | None = None
        self.turns: list[Turn] = []
        self.transcript_title = "Med3DVLM conversation"
        self._streaming = False
        self._explainable: set[str] = set()
        self._score_rows: list = []
        self.owns_selector = volume_selector is None
        self.volume_selector = QComboBox() if self.owns_selector else volume_selector
        self.region_selector = QComboBox() if region_selector is None else region_selector
        self._build()

    # ----- layout -----------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(QLabel("Volume:"))
        top.addWidget(self.volume_selector, 1)
        layout.addLayout(top)
        layout.addLayout(self._build_framing())
        self.model_label = QLabel("Model: –")
        layout.addWidget(self.model_label)
        self.view = QTextBrowser()
        self.view.setOpenLinks(False)  # Show evidence links are actions, not pages to open
        self.view.anchorClicked.connect(self._link_clicked)
        layout.addWidget(self.view, 1)
        layout.addLayout(self._build_scores())
        self.question_box = QuestionBox(self._send)
        self.question_box.setPlaceholderText("Ask about the volume (Enter sends, Shift+Enter: new line, Up: earlier questions)")
        self.question_box.setMaximumHeight(70)
        layout.addWidget(self.question_box)
        self.report_button = self._button("Generate report", lambda: self._call(self.on_report))
        self.send_button = self._button("Send", self._send)
        self.stop_button = self._button("Stop", lambda: self._call(self.on_stop))
        self.clear_button = self._button("Clear", lambda: self._call(self.on_clear))
        self.copy_button = self._button("Copy", self.copy_transcript)
        self.save_button = self._button("Save…", self._ask_save_path)
        buttons = QHBoxLayout()
        for button in (self.report_button, self.send_button, self.stop_button, self.clear_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.copy_button)
        buttons.addWidget(self.save_button)
        layout.addLayout(buttons)
        status = QHBoxLayout()
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(120)
        self.progress.setTextVisible(False)
        self.progress.setVisible(False)
        self.restart_button = self._button("Restart", lambda: self._call(self.on_restart))
        self.restart_button.setToolTip("Start the model server again (or reconnect to the remote one)")
        self.restart_button.setVisible(False)
        status.addWidget(self.status_label, 1)
        status.addWidget(self.progress)
        status.addWidget(self.restart_button)
        layout.addLayout(status)
        self.settings_toggle = self._button("Settings ▸", self._toggle_settings)
        layout.addWidget(self.settings_toggle)
        self.settings_box = self._build_settings()
        self.settings_box.setVisible(False)
        layout.addWidget(self.settings_box)
        self.stop_button.setEnabled(False)
        self.show_scores(None)
        if hasattr(self.volume_selector, "currentNodeChanged"):  # qMRMLNodeComboBox (PythonQt)
            self.volume_selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self._call(self.on_volume_changed))
        else:
            self.volume_selector.currentIndexChanged.connect(lambda *_: self._call(self.on_volume_changed))

    def _build_framing(self) -> QHBoxLayout:
        """The region questions are about, the window the model is shown, and what the model sees."""
        self.region_selector.setToolTip("Reports, questions, scores and evidence about the box of this Markups ROI "
                                        "only (shown to the model at up to the scan's resolution); none: the whole "
                                        "volume")
        self.window_check = QCheckBox("Slice view's window/level")
        self.window_check.setToolTip("Show the model a CT in the window/level of the slice views instead of its own. "
                                     "The model was trained with a fixed window: its answers may be less reliable.")
        self.model_view_button = self._button("Model's view", lambda: self._call(self.on_model_view))
        self.model_view_button.setToolTip("Show what the model is given (its input, over the scan) and the box of the "
                                          "scan it covers")
        row = QHBoxLayout()
        row.addWidget(QLabel("Region:"))
        row.addWidget(self.region_selector, 1)
        row.addWidget(self.window_check)
        row.addWidget(self.model_view_button)
        return row

    def _build_scores(self) -> QVBoxLayout:
        """Detect button, a one-line summary and the score table (shown once the volume has scores)."""
        self.detect_button = self._button("Detect abnormalities", lambda: self._call(self.on_detect))
        self.detect_button.setToolTip("MRI abnormality scores (MedMAP); kept in the scene as a table")
        self.scores_label = QLabel()
        self.score_evidence_button = self._button("Show evidence", self._score_evidence)
        self.score_evidence_button.setToolTip("Where in the scan the selected score came from")
        header = QHBoxLayout()
        header.addWidget(self.detect_button)
        header.addWidget(self.scores_label, 1)
        header.addWidget(self.score_evidence_button)
        table = self.scores_table = QTableWidget(0, len(SCORE_HEADERS))
        table.setHorizontalHeaderLabels(list(SCORE_HEADERS))
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.setSelectionBehavior(QAbstractItemView.SelectRows)
        table.verticalHeader().setVisible(False)
        table.verticalHeader().setDefaultSectionSize(table.fontMetrics().height() + 6)
        for column in range(len(SCORE_HEADERS)):  # names share the spare width, numbers fit their text
            mode = QHeaderView.Stretch if column < 2 else QHeaderView.ResizeToContents
            table.horizontalHeader().setSectionResizeMode(column, mode)
        table.setMaximumHeight(190)  # about eight rows: the conversation keeps most of the height
        box = QVBoxLayout()
        box.addLayout(header)
        box.addWidget(table)
        return box

    def _build_settings(self) -> QWidget:
        box = QWidget()
        form = QFormLayout(box)
        self.model_edit = QComboBox()
        self.model_edit.setEditable(True)
        self.model_edit.addItem("demo")
        browse = self._button("Browse…", self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model_edit, 1)
        row.addWidget(browse)
        form.addRow("Model (demo or folder):", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        form.addRow("Device:", self.device_combo)
        self.dtype_combo = QComboBox()
        self.dtype_combo.addItems(list(PRECISIONS))
        form.addRow("Precision:", self.dtype_combo)
        self.quantization_combo = QComboBox()
        self.quantization_combo.addItems(list(QUANTIZATIONS))
        self.quantization_combo.setToolTip("Store the language model in 8 or 4 bits (bitsandbytes): the 7B model "
                                           "then fits a 16 GB GPU; slower on the CPU")
        form.addRow("Quantization:", self.quantization_combo)
        self.tokens_spin = QSpinBox()
        self.tokens_spin.setRange(1, 8192)
        form.addRow("Max new tokens:", self.tokens_spin)
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(0.0, 2.0)
        self.temperature_spin.setSingleStep(0.1)
        self.temperature_spin.setToolTip("0 = deterministic (greedy) answers")
        form.addRow("Temperature:", self.temperature_spin)
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 64)
        self.samples_spin.setToolTip("Forward and backward passes of an evidence map: more give a smoother map and "
                                     "take longer")
        form.addRow("Evidence passes:", self.samples_spin)
        self.server_edit = QLineEdit()
        self.server_edit.setPlaceholderText("this computer (a local server)")
        self.server_edit.setToolTip("A remote model server, e.g. https://gpu.lab.example/med3dvlm (med3dvlm serve); "
                                    "empty: the module runs its own server on this computer")
        form.addRow("Server:", self.server_edit)
        self.token_edit = QLineEdit()
        self.token_edit.setEchoMode(QLineEdit.Password)
        self.token_edit.setPlaceholderText("the remote server's access token (kept for this session only)")
        form.addRow("Token:", self.token_edit)
        form.addRow("", self._button("Apply", lambda: self._call(self.on_apply_settings, self.settings_values())))
        return box

    def _button(self, text: str, slot) -> QPushButton:
        button = QPushButton(text)
        button.clicked.connect(lambda *_: slot())
        return button

    @staticmethod
    def _call(callback, *args) -> None:
        if callback is not None:
            callback(*args)

    # ----- volume selector ------------------------------------------------------------------------
    def set_volume_choices(self, choices: list[tuple[str, str]]) -> None:
        """(ID, name) pairs for the plain combo; keeps the selection when it is still there."""
        current = self.selected_volume_id()
        combo = self.volume_selector
        if [(combo.itemData(i), combo.itemText(i)) for i in range(prop(combo, "count"))] == list(choices):
            return
        combo.blockSignals(True)
        combo.clear()
        for node_id, name in choices:
            combo.addItem(name, node_id)
        index = combo.findData(current) if current else -1
        combo.setCurrentIndex(index if index >= 0 else (0 if choices else -1))
        combo.blockSignals(False)
        if self.selected_volume_id() != current:
            self._call(self.on_volume_changed)

    def set_region_choices(self, choices: list[tuple[str, str]]) -> None:
        """(ID, name) pairs of Markups ROIs for the plain region combo, after "Whole volume"; keeps
        the selection when it is still there."""
        current, combo = self.selected_region_id(), self.region_selector
        combo.blockSignals(True)
        combo.clear()
        combo.addItem("Whole volume", "")
        for node_id, name in choices:
            combo.addItem(name, node_id)
        combo.setCurrentIndex(max(0, combo.findData(current) if current else 0))
        combo.blockSignals(False)

    def selected_volume_id(self) -> str | None:
        return self._selected(self.volume_selector)

    def selected_region_id(self) -> str | None:
        """The Markups ROI the requests are about; None: the whole volume."""
        return self._selected(self.region_selector)

    @staticmethod
    def _selected(selector) -> str | None:
        name = "currentNodeID" if hasattr(selector, "currentNodeID") else "currentData"
        return prop(selector, name) or None

    def use_view_window(self) -> bool:
        return self.window_check.isChecked()

    # ----- conversation ---------------------------------------------------------------------------
    def show_turns(self, turns: list[Turn], streaming: bool = False, explainable: set[str] | None = None) -> None:
        """Show ``turns``; with ``streaming`` the last one is a model turn still receiving text. The
        answers whose time is in ``explainable`` get a Show evidence link (kept until told again)."""
        self.turns = list(turns)
        if explainable is not None:
            self._explainable = set(explainable)
        self._streaming = streaming and bool(turns)
        done = turns[:-1] if self._streaming else turns
        parts = [_turn_html(t, markdown_to_html(t.text), t.role == "model" and t.time in self._explainable)
                 for t in done]
        if self._streaming:  # raw text while streaming: the last block is where new text goes
            parts.append(_turn_html(turns[-1], f"<p>{html.escape(turns[-1].text).replace(chr(10), '<br>')}</p>"))
        self.view.setHtml("".join(parts))
        self._scroll_to_end()

    def append_stream(self, piece: str) -> None:
        """Add streamed text at the end of the model turn (cheap: no re-rendering)."""
        if not self._streaming:
            return
        self.turns[-1].text += piece
        bar = self.view.verticalScrollBar()
        at_end = prop(bar, "value") >= prop(bar, "maximum") - 4
        cursor = self.view.textCursor()
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(piece)
        if at_end:
            self._scroll_to_end()

    def show_error(self, message: str, restart: bool = False, role: str = "error") -> None:
        """A message in the conversation (not stored) and in the status line; with ``restart``,
        the Restart button (the model server stopped or cannot be reached). ``role`` "warning":
        a note on an answer that was made (otherwise than the model was trained)."""
        self.restart_button.setVisible(restart)
        error = Turn(role, message, now())
        if self._streaming:  # keep the answer being streamed last
            self.show_turns(self.turns[:-1] + [error, self.turns[-1]], streaming=True)
        else:
            self.show_turns(self.turns + [error])
        self.set_status(message)

    def _link_clicked(self, url) -> None:
        link = url.toString()
        if link.startswith(EVIDENCE_LINK):
            self._call(self.on_evidence, link[len(EVIDENCE_LINK):])

    def _scroll_to_end(self) -> None:
        bar = self.view.verticalScrollBar()
        bar.setValue(prop(bar, "maximum"))

    def _send(self) -> None:
        question = self.question_box.toPlainText().strip()
        if not question or not self.send_button.isEnabled():  # busy: the text stays in the box
            return
        self.question_box.remember(question)
        self.question_box.clear()
        self._call(self.on_send, question)

    # ----- abnormality scores -----------------------------------------------------------------------
    def show_scores(self, scores) -> None:
        """A volume's stored scores (``rows`` highest probability first, ``sequences``, ``model``);
        None hides the table (no detection yet, or not an MRI volume)."""
        rows = self._score_rows = scores.rows if scores is not None else []
        self.scores_table.setVisible(bool(rows))
        self.score_evidence_button.setVisible(bool(rows))
        self.scores_table.setRowCount(len(rows))
        right, center = Qt.AlignRight | Qt.AlignVCenter, Qt.AlignCenter
        for index, row in enumerate(rows):
            cells = (row.organ, row.abnormality, f"{row.probability:.2f}",
                     f"{row.threshold:.2f}" if row.called else "not called", "yes" if row.above else "")
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if column >= 2:
                    item.setTextAlignment(center if column == 4 else right)
                if row.above:  # the labels the detector calls present stand out
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                self.scores_table.setItem(index, column, item)
        if rows:
            above = sum(row.above for row in rows)
            source = ", ".join(scores.sequences + ([f"model {scores.model}"] if scores.model else []))
            uncalled = sum(not row.called for row in rows)
            note = f"; {uncalled} not called on these sequences" if uncalled else ""
            self.scores_label.setText(f"{above} of {len(rows)} above threshold{note} ({source})")
        else:
            self.scores_label.setText("")

    def _score_evidence(self) -> None:
        row = self.scores_table.currentRow()
        if 0 <= row < len(self._score_rows):
            score = self._score_rows[row]
            self._call(self.on_score_evidence, f"{score.abnormality} in the {score.organ}")
        else:
            self.set_status("Select a score in the table first, then press Show evidence.")

    # ----- state --------------------------------------------------------------------------------
    def set_busy(self, busy: bool) -> None:
        for button in (self.report_button, self.detect_button, self.send_button, self.clear_button,
                       self.model_view_button, self.score_evidence_button):
            button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        if not busy:
            self.progress.setVisible(False)

    def set_status(self, message: str, busy: bool = False, tokens: int = 0, max_tokens: int = 0) -> None:
        """Status line; while busy a progress bar: tokens of ``max_tokens``, or indeterminate."""
        self.status_label.setText(message)
        self.progress.setVisible(busy)
        if busy:
            self.progress.setRange(0, max_tokens if tokens else 0)
            self.progress.setValue(min(tokens, max_tokens))

    def set_model_label(self, text: str) -> None:
        self.model_label.setText(text)

    # ----- transcript -----------------------------------------------------------------------------
    def transcript(self) -> str:
        return transcript_markdown(self.turns, title=self.transcript_title)

    def copy_transcript(self) -> None:
        QApplication.clipboard().setText(self.transcript())
        self.set_status("Transcript copied to the clipboard.")

    def save_transcript(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.transcript())
        self.set_status(f"Transcript saved to {path}.")

    def _ask_save_path(self) -> None:
        chosen = QFileDialog.getSaveFileName(self, "Save transcript", "transcript.md", "Markdown (*.md);;Text (*.txt)")
        path = chosen[0] if isinstance(chosen, tuple) else chosen  # PySide returns (path, filter)
        if path:
            try:
                self.save_transcript(path)
            except OSError as error:
                self.show_error(f"Could not save the transcript to {path}: {error.strerror}.")

    # ----- settings -------------------------------------------------------------------------------
    def _toggle_settings(self) -> None:
        visible = self.settings_box.isHidden()
        self.settings_box.setVisible(visible)
        self.settings_toggle.setText("Settings ▾" if visible else "Settings ▸")

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (config.json and *.safetensors)")
        if folder:
            self.model_edit.setEditText(folder)

    def settings_values(self) -> dict:
        return {"model": prop(self.model_edit, "currentText").strip(),
                "device": DEVICES[prop(self.device_combo, "currentIndex")],
                "dtype": PRECISIONS[prop(self.dtype_combo, "currentIndex")],
                "quantization": QUANTIZATIONS[prop(self.quantization_combo, "currentIndex")],
                "max_new_tokens": prop(self.tokens_spin, "value"),
                "temperature": round(prop(self.temperature_spin, "value"), 2),
                "evidence_samples": prop(self.samples_spin, "value"),
                "server": prop(self.server_edit, "text").strip(),
                "token": prop(self.token_edit, "text").strip()}

    def set_settings_values(self, values: dict) -> None:
        self.model_edit.setEditText(str(values["model"]))
        self.device_combo.setCurrentIndex(DEVICES.index(values["device"]))
        self.dtype_combo.setCurrentIndex(PRECISIONS.index(values["dtype"]))
        self.quantization_combo.setCurrentIndex(QUANTIZATIONS.index(values["quantization"]))
        self.tokens_spin.setValue(int(values["max_new_tokens"]))
        self.temperature_spin.setValue(float(values["temperature"]))
        self.samples_spin.setValue(int(values["evidence_samples"]))
        self.server_edit.setText(str(values.get("server", "")))  # the token is never filled in from settings
