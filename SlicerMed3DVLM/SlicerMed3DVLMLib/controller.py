"""Connects the chat panel to the logic: user actions become requests, results update the panel.

Holds no state of its own beyond the request in flight; both the Slicer widget and the tests
use it, so what the tests exercise is what users run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from med3dvlm.errors import Med3DVLMError

from .chat_panel import ChatPanel
from .logic import Med3DVLMLogic, Result, Status


class ChatController:
    def __init__(self, panel: ChatPanel, logic: Med3DVLMLogic, prepare: Callable[[], None] | None = None) -> None:
        """``prepare()`` runs before each request (Slicer: install missing packages with consent);
        it raises Med3DVLMError to refuse with a message."""
        self.panel, self.logic, self.prepare = panel, logic, prepare
        self._streaming_volume: str | None = None
        panel.on_send = self.ask
        panel.on_report = self.generate_report
        panel.on_detect = self.detect
        panel.on_stop = self.logic.cancel
        panel.on_clear = self.clear
        panel.on_volume_changed = self.show_volume
        panel.on_apply_settings = self.apply_settings
        panel.on_restart = self.restart
        panel.on_evidence = self.show_evidence
        panel.on_score_evidence = self.show_score_evidence
        panel.on_model_view = self.show_model_view
        if panel.owns_selector:
            logic.add_volumes_listener(self.refresh_volumes)
            self.refresh_volumes()
        panel.set_settings_values(asdict(logic.settings))
        self.update_model_label()
        self.show_volume()

    def refresh_volumes(self) -> None:
        self.panel.set_volume_choices(self.logic.volume_choices())
        self.panel.set_region_choices(self.logic.region_choices())

    def show_volume(self) -> None:
        """Show the selected volume's reports, conversation and abnormality scores (as stored in the
        scene, where a streaming answer is complete up to the last token delivered)."""
        volume = self.panel.selected_volume_id()
        self.panel.transcript_title = f"Med3DVLM conversation — {self.logic.volume_name(volume)}"
        streaming = self.logic.busy and volume == self._streaming_volume
        self._show_turns(volume, streaming)
        self.panel.show_scores(self.logic.abnormality_scores(volume))

    def _show_turns(self, volume: str | None, streaming: bool = False) -> None:
        self.panel.show_turns(self.logic.session_turns(volume), streaming=streaming,
                              explainable=self.logic.explainable_answers(volume))

    def _framing(self, volume: str | None, window: bool = True) -> dict:
        """The region and window the panel asks about: its ROI, and the slice view's window/level
        if ticked (read now, as the user sees it)."""
        framing = {"region": self.panel.selected_region_id()}
        if window and self.panel.use_view_window() and volume is not None:
            framing["window"] = self.logic.display_window(volume)
        return framing

    def generate_report(self) -> None:
        self._start(lambda volume, **callbacks: self.logic.generate_report(volume, **callbacks, **self._framing(volume)))

    def ask(self, question: str) -> None:
        self._start(lambda volume, **callbacks: self.logic.ask(volume, question, **callbacks, **self._framing(volume)))

    def detect(self) -> None:
        self._start(lambda volume, **callbacks: self.logic.detect(volume, **callbacks, **self._framing(volume, False)),
                    stream=False)

    def show_evidence(self, answer: str) -> None:
        self._start(lambda volume, **callbacks: self.logic.show_evidence(volume, answer, **callbacks), chat=False)

    def show_score_evidence(self, label: str) -> None:
        self._start(lambda volume, **callbacks: self.logic.show_score_evidence(volume, label, **callbacks), chat=False)

    def show_model_view(self) -> None:
        self._start(lambda volume, **callbacks: self.logic.show_model_view(volume, **callbacks, **self._framing(volume)),
                    chat=False)

    def _start(self, request, stream: bool = True, chat: bool = True) -> None:
        """Send ``request(volume, on_done=..., on_status=..., [on_token=...])``; a ``chat`` request
        writes turns (streamed with ``stream``), others make nodes over the scan (or show one made
        before at once, without the server)."""
        volume = self.panel.selected_volume_id()
        try:
            if self.prepare is not None:
                self.prepare()
            callbacks = {"on_done": self._done, "on_status": self._status}
            if stream and chat:
                callbacks["on_token"] = self._token
            request(volume, **callbacks)
        except Med3DVLMError as error:  # no volume, 2D volume, busy, empty question, no region, refused install
            self.panel.show_error(str(error))
            return
        if not self.logic.busy:  # answered at once (an evidence map shown again)
            return
        self._streaming_volume = volume
        if chat:
            self._show_turns(volume, streaming=stream)
        self.panel.set_busy(True)

    def _token(self, piece: str) -> None:
        if self.panel.selected_volume_id() == self._streaming_volume:
            self.panel.append_stream(piece)

    def _status(self, status: Status) -> None:
        busy = status.stage in ("loading", "encoding", "generating", "explaining", "preprocessing")
        self.panel.set_status(status.message, busy, status.tokens, status.max_tokens)
        self.update_model_label()

    def _done(self, result: Result) -> None:
        volume, self._streaming_volume = self._streaming_volume, None
        self.panel.set_busy(False)
        if self.panel.selected_volume_id() == volume or volume is None:  # None: shown again at once
            self._show_turns(self.panel.selected_volume_id())
            self.panel.show_scores(self.logic.abnormality_scores(self.panel.selected_volume_id()))
            if result.error:
                self.panel.show_error(result.error, restart=result.restart)
            for warning in result.warnings:
                self.panel.show_error(warning, role="warning")

    def clear(self) -> None:
        try:
            self.logic.clear_session(self.panel.selected_volume_id())
        except Med3DVLMError as error:
            self.panel.show_error(str(error))
            return
        self.panel.show_turns([])
        self.panel.set_status("Chat cleared; earlier reports and conversations stay in the scene.")

    def restart(self) -> None:
        try:
            self.logic.restart_server()
        except Med3DVLMError as error:
            self.panel.show_error(str(error))
            return
        self.panel.restart_button.setVisible(False)
        self.update_model_label()
        self.panel.set_status("Reconnecting to the model server…" if self.logic.settings.server
                              else "Starting the model server again…")

    def apply_settings(self, values: dict) -> None:
        values = dict(values)
        token = values.pop("token", "")
        before = (self.logic.settings.load_key, self.logic.settings.server)
        try:
            settings = self.logic.update_settings(**values)
        except (TypeError, ValueError) as error:
            self.panel.show_error(f"Settings not applied: {error}.")
            return
        if token or not settings.server:
            self.logic.set_server_token(token or None)  # memory only
        self.panel.set_settings_values(asdict(settings))
        self.update_model_label()
        reload = (settings.load_key, settings.server) != before
        self.panel.set_status("Settings saved" + ("; the model loads with the next request." if reload else "."))

    def update_model_label(self) -> None:
        if self.logic.model_is_loaded:
            text = f"Model: {self.logic.loaded_model}"
        elif self.logic.settings.server:
            text = f"Model: on {self.logic.settings.server} (connects on first use)"
        else:
            text = f"Model: {self.logic.settings.model} (loads on first use)"
        self.panel.set_model_label(text)
