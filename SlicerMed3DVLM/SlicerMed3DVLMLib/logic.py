"""The module logic: reports, questions and findings for volume nodes, usable from the Python console.

    logic = Med3DVLMLogic(slicer.mrmlScene)
    text = logic.generate_report(volume_node)                       # blocks, returns the report
    logic.ask(volume_node, "Is there a lesion?", on_token=print,    # returns the text node at once;
              on_done=lambda result: print(result.text))            # callbacks run on the main thread
    logic.ask(volume_node, "And here?", region=roi_node)            # about the box of a Markups ROI
    scores = logic.detect(mri_node)                                 # {label: probability}, kept as a table
    logic.show_evidence(volume_node, answer_turn.time)              # its evidence map, over the scan
    logic.show_model_view(volume_node)                              # what the model is shown, and its box

No model code runs in Slicer's interpreter: requests go to a model server (the module's own local
one, started on first use with Slicer's Python, or a remote one from the settings), driven from a
timer on the main thread (see server_link). One request at a time: a second one while the first
runs is refused with ``BusyError`` (not queued, so that nothing runs that the user has forgotten
about). MRML nodes are read and written only here, on the main thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from med3dvlm.client import tasks
from med3dvlm.client.transport import Server
from med3dvlm.detection_result import NOT_CALLED, DetectionResult
from med3dvlm.errors import Med3DVLMError

from . import evidence_nodes, score_table, text_nodes
from .local_server import Command, LocalServer, ServerFailure, serve_command
from .overlays import OVERLAY, add_model_view, show_over
from .region_node import display_window, region_of
from .server_link import Request, ServerLink
from .settings import Settings, SettingsStore, load_settings, save_settings
from .transcript import Turn, now, qa_pairs
from .volume_node import DicomLookup, NodeVolume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asked:
    """What a request asks: the question (for ``ask``), the conversation's earlier (question,
    answer) pairs, the generation settings, and the region (two opposite corners, RAS mm) and CT
    window (centre, width) it is about; for evidence, the answer explained, which answer that is
    (``key``: its turn's time, or a score's label) and the attribution's passes."""

    question: str
    history: list[tuple[str, str]]
    generation: dict
    region: list[list[float]] | None = None
    window: list[float] | None = None
    answer: str | None = None
    key: str = ""
    samples: int = 8


@dataclass(frozen=True)
class Kind:
    """One kind of request: how the chat and the scene show it, and the server task that answers
    it. A new kind is one entry in KINDS (and its task in med3dvlm.client.tasks)."""

    role: str | None  # of its text node: a conversation goes on in the volume's current one; others start a
    #                   node; None: no chat turns, the request makes nodes over the scan (``finish`` does)
    label: str  # the user's turn in the chat; "" when that is the question typed
    what: str  # names it in messages ("Not enough memory for the report")
    job: Callable[[Server, str, Asked, Callable[[dict], None]], Any]  # (server, digest, asked, on_event) -> task
    working: str = ""  # the status while the server works, for a kind that streams no tokens
    ready: str = ""  # the status when done, for such a kind
    finish: Callable[[Any, "_Request", dict], str] | None = None  # (scene, request, done event) -> its text


def _present(scene, request: "_Request") -> bool:
    """The scan (and the node the request writes to, if any) are still in the scene to write into."""
    return not request.detached and scene.IsNodePresent(request.volume) and (
        request.node is None or scene.IsNodePresent(request.node))


def _write_scores(scene, request: "_Request", final: dict) -> str:
    """The scores of a done ``detect`` into the volume's table node; their text for the chat."""
    if not final.get("detection"):
        return ""
    scores = DetectionResult.from_dict(final["detection"])
    if _present(scene, request):
        table = score_table.write_scores(scene, request.volume, scores, request.model)
        text_nodes.set_provenance(table, final.get("provenance"))
        text_nodes.set_framing(table, request.asked.region, None)  # the scores' evidence is of the same box
    request.result.scores = dict(scores)
    return "\n".join(f"{s.label}: {s.probability:.2f}" + ("" if s.called else f" ({NOT_CALLED})") for s in scores.scores)


def _add_evidence(scene, request: "_Request", final: dict) -> str:
    """The map of a done ``explain`` (or ``explain-score``: one volume, one map) over the scan,
    referenced from the node of the answer; its name."""
    found = final.get("evidence")
    if not found or not _present(scene, request):
        return ""  # stopped, or the scan or the answer is gone
    if "map" not in found:
        (found,) = found.values()
    asked = request.asked
    node = evidence_nodes.add_evidence(scene, request.volume, request.node, asked.key, asked.answer or asked.key,
                                       found["map"], final.get("provenance"))
    show_over(scene, request.volume, node, evidence_nodes.OPACITY)
    request.result.node_id = node.GetID()
    return node.GetName()


def _add_view(scene, request: "_Request", final: dict) -> str:
    """The model's input of a done ``view`` over the scan, with its box as an ROI; its name."""
    if not final.get("view") or not _present(scene, request):
        return ""
    node, _ = add_model_view(scene, request.volume, final["view"], final.get("provenance"))
    show_over(scene, request.volume, node, 1.0)  # the input covers its box; the scan shows around it
    request.result.node_id = node.GetID()
    return node.GetName()


KINDS = {
    "report": Kind(text_nodes.REPORT_ROLE, "Generate a report", "the report", lambda server, digest, asked, on_event:
                   tasks.report(server, digest, on_event, generation=asked.generation, region=asked.region,
                                window=asked.window)),
    "ask": Kind(text_nodes.CONVERSATION_ROLE, "", "the answer", lambda server, digest, asked, on_event:
                tasks.ask(server, digest, asked.question, on_event, history=asked.history, generation=asked.generation,
                          region=asked.region, window=asked.window)),
    "detect": Kind(text_nodes.FINDINGS_ROLE, "Detect abnormalities", "abnormality detection",
                   lambda server, digest, asked, on_event: tasks.detect(server, [digest], on_event, region=asked.region),
                   working="Scoring abnormalities…", ready="Done: abnormality scores ready.", finish=_write_scores),
    "explain": Kind(None, "", "the evidence map", lambda server, digest, asked, on_event: tasks.explain(
                        server, digest, on_event, question=asked.question or None, answer=asked.answer,
                        history=asked.history, region=asked.region, window=asked.window, samples=asked.samples),
                    ready="Done: the evidence map is shown over the scan.", finish=_add_evidence),
    "explain-score": Kind(None, "", "the evidence map", lambda server, digest, asked, on_event: tasks.explain_score(
                              server, [digest], asked.key, on_event, region=asked.region, samples=asked.samples),
                          ready="Done: the evidence map is shown over the scan.", finish=_add_evidence),
    "view": Kind(None, "", "the model's view", lambda server, digest, asked, on_event: tasks.view(
                     server, digest, on_event, region=asked.region, window=asked.window),
                 ready="Done: the model's input and its box are shown over the scan.", finish=_add_view),
}


class BusyError(Med3DVLMError):
    """A request came while another one runs."""


@dataclass
class Result:
    kind: str  # a key of KINDS
    text: str = ""  # the answer, or the name of the node made (an evidence map, the model's view)
    node_id: str | None = None  # the answer's text node, or the node made
    scores: dict[str, float] | None = None
    stopped: bool = False
    error: str | None = None  # a sentence for the user when the request failed
    restart: bool = False  # the server died or could not be reached: offer Restart
    warnings: list[str] = field(default_factory=list)  # made otherwise than the model was trained (a CT window)


@dataclass
class Status:
    stage: str  # starting, loading, queued, encoding, generating, explaining, preprocessing, done, stopped, failed
    message: str
    tokens: int = 0  # tokens so far, or passes of an evidence map
    max_tokens: int = 0


def user_message(error: BaseException, kind: str) -> str:
    if isinstance(error, Med3DVLMError):
        return str(error)
    if isinstance(error, MemoryError):
        return f"Not enough memory for {KINDS[kind].what}; close other programs or choose the CPU or a smaller model."
    return (f"Unexpected error during {KINDS[kind].what} ({type(error).__name__}: {error}); "
            "the details are in the Python console.")


def describe_model(model: dict, remote: Server | None) -> str:
    """'demo (cpu, float32)': the model that answered, with the device and precision it really got
    ('... LM 4bit' with a quantized language model, '... at gpu-box:8000' on a remote server)."""
    quantized = f", LM {model['quantization']}" if model.get("quantization") else ""
    where = f" at {remote.host}:{remote.port}" if remote is not None else ""
    return f"{model['name']} ({model['device']}, {model['dtype']}{quantized}){where}"


class _Request:
    """State of the running request, owned by the main thread."""

    def __init__(self, kind: str, volume, node, turns: list[Turn] | None, asked: Asked, callbacks: dict,
                 max_tokens: int, model: str) -> None:
        """``node``: the text node (or score table) written to or referenced, None for the model's
        view; ``turns``: the chat turns being written, None for a kind that makes nodes."""
        self.kind, self.volume, self.node, self.turns, self.callbacks = kind, volume, node, turns, callbacks
        self.asked, self.max_tokens, self.model = asked, max_tokens, model
        self.tokens = 0
        self.started = 0.0  # when generation started, for the token rate
        self.last_token = 0.0
        self.detached = False  # the scene closed: stop writing into it
        self.result = Result(kind, node_id=node.GetID() if turns is not None else None)
        self.exception: BaseException | None = None
        self.link_request: Request | None = None
        self.server_key: tuple = ()  # the model and server settings it was sent with


class Med3DVLMLogic:
    def __init__(self, scene, *, store: SettingsStore | None = None, dicom_lookup: DicomLookup | None = None,
                 poll_ms: int = 15, server_command: Command = serve_command) -> None:
        """``server_command(settings, ready_file)`` is the command line of the local model server
        (default: ``med3dvlm serve`` with Slicer's Python)."""
        self.scene = scene
        self._store = store
        self._settings = load_settings(store)
        self._token = os.environ.get("MED3DVLM_TOKEN") or None  # for a remote server; never stored
        self._dicom_lookup = dicom_lookup
        self._link = ServerLink(LocalServer(server_command), poll_ms)
        self.loaded_model: str | None = None  # "name (device, precision)" of the model that last answered
        self._loaded_key: tuple | None = None
        self._request: _Request | None = None
        self._volume_listeners: list[Callable[[], None]] = []
        self._observers = [scene.AddObserver(scene.StartCloseEvent, self._on_scene_start_close)]
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent, scene.EndImportEvent):
            self._observers.append(scene.AddObserver(event, self._on_scene_changed))
        self._configure()

    # ----- settings and state ---------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self._settings

    def update_settings(self, **changes: Any) -> Settings:
        """Change and store settings; a new model, device, precision or server applies to the next
        request (the local server restarts with it)."""
        self._settings = self._settings.updated(**changes)
        save_settings(self._store, self._settings)
        self._configure()
        return self._settings

    def set_server_token(self, token: str | None) -> None:
        """The remote server's access token, kept in memory only (never in settings or the scene)."""
        self._token = (token or "").strip() or None
        self._configure()

    @property
    def has_server_token(self) -> bool:
        return self._token is not None

    def _configure(self) -> None:
        url = self._settings.server
        self._link.configure(self._settings, Server(url, self._token) if url else None)

    @property
    def _server_key(self) -> tuple:
        return self._settings.load_key, self._settings.server

    @property
    def busy(self) -> bool:
        return self._link.busy

    @property
    def model_is_loaded(self) -> bool:
        """True when the model of the current settings has answered (the next request starts at once)."""
        return self.loaded_model is not None and self._loaded_key == self._server_key

    @property
    def local_server(self) -> LocalServer:
        return self._link.local

    def cancel(self) -> bool:
        """Stop the running request (its partial text is kept); False if none runs."""
        busy = self.busy
        self._link.cancel()
        return busy

    def restart_server(self) -> None:
        """Start a fresh local server (or reconnect to the remote one) after a failure."""
        if self._request is not None:
            raise BusyError("Med3DVLM is still working; press Stop before restarting the server.")
        self.loaded_model = self._loaded_key = None
        self._link.restart()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the request and the local server and forget the scene (module closed; the logic is
        not usable afterwards); True when the server process has ended."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        if self._request is not None:
            self._request.detached = True
        self._request = None
        self._link.shutdown(timeout)
        return not self._link.local.running

    # ----- requests ---------------------------------------------------------------------------
    def generate_report(self, volume_node, on_token=None, on_done=None, on_status=None, *, region=None, window=None):
        """A report of the volume, or of the box of ``region`` (a Markups ROI node or its ID) shown in
        ``window`` ((centre, width), e.g. ``display_window(volume_node)``). Blocks and returns the
        text unless ``on_done`` is given; then it returns the text node being filled and calls
        ``on_done(Result)`` when finished."""
        return self._run("report", volume_node, self._asked("", region, window), on_token, on_done, on_status)

    def ask(self, volume_node, question: str, on_token=None, on_done=None, on_status=None, *, region=None,
            window=None):
        """An answer about the volume (or ``region``, in ``window``: see ``generate_report``),
        continuing its conversation; blocking unless ``on_done`` is given."""
        return self._run("ask", volume_node, self._asked(question, region, window), on_token, on_done, on_status)

    def detect(self, volume_node, on_done=None, on_status=None, *, region=None):
        """Abnormality scores {name: probability} of the volume (or ``region``); blocking unless
        ``on_done`` is given."""
        return self._run("detect", volume_node, self._asked("", region, None), None, on_done, on_status)

    def show_evidence(self, volume_node, answer: str, on_done=None, on_status=None):
        """The evidence map of the report or chat answer whose turn has the time ``answer`` (a
        ``Turn.time`` of ``session_turns``), over the scan in the slice views: made by the server the
        first time (about the region and window the answer was about), shown again after that.
        Returns the map node when blocking (no ``on_done``)."""
        node = self._resolve(volume_node)
        record, asked = self._answer(node, answer)
        return self._show("explain", node, record, asked, on_done, on_status)

    def show_score_evidence(self, volume_node, label: str, on_done=None, on_status=None):
        """The evidence map of one abnormality score (``"cyst in the liver"``) of the volume's score
        table, as ``show_evidence``."""
        node = self._resolve(volume_node)
        table = score_table.find_table(self.scene, node) if node is not None else None
        if table is None:
            raise Med3DVLMError("This volume has no abnormality scores yet; press Detect abnormalities first.")
        region, _ = text_nodes.framing(table)
        asked = Asked(label, [], {}, region=region, key=label, samples=self._settings.evidence_samples)
        return self._show("explain-score", node, table, asked, on_done, on_status)

    def show_model_view(self, volume_node, on_done=None, on_status=None, *, region=None, window=None):
        """What the model is shown of the volume (or ``region``, in ``window``) as a volume node over
        the scan, and the box of the scan it covers as a Markups ROI; returns the node when blocking."""
        return self._run("view", volume_node, self._asked("", region, window), None, on_done, on_status)

    def display_window(self, volume_node) -> tuple[float, float]:
        """(centre, width) of the window/level the slice views show the volume with."""
        return display_window(self._resolve(volume_node))

    def explainable_answers(self, volume_node) -> set[str]:
        """The times of the volume's answers that Show evidence explains: reports and chat answers."""
        node = self._resolve(volume_node)
        return {turn.time for record in (text_nodes.records(self.scene, node, include_archived=True) if node else [])
                if text_nodes.record_role(record) != text_nodes.FINDINGS_ROLE
                for turn in text_nodes.get_turns(record) if turn.role == "model" and turn.text}

    def _asked(self, question: str, region, window) -> Asked:
        """What a request from the chat asks; the region's box is read now (RegionError at once)."""
        region_node = self._resolve(region)
        corners = None if region_node is None else [list(corner) for corner in region_of(region_node)]
        return Asked((question or "").strip(), [], self._settings.generation(), corners,
                     None if window is None else [float(window[0]), float(window[1])])

    def _answer(self, node, key: str) -> tuple[Any, Asked]:
        """The text node holding the answer ``key`` and what to ask the server to explain it: the
        question and earlier turns it answered, the region and window it was about."""
        for record in text_nodes.records(self.scene, node, include_archived=True) if node is not None else []:
            role, turns = text_nodes.record_role(record), text_nodes.get_turns(record)
            for index, turn in enumerate(turns):
                if role != text_nodes.FINDINGS_ROLE and turn.role == "model" and turn.time == key and turn.text:
                    conversation = role == text_nodes.CONVERSATION_ROLE
                    question = turns[index - 1].text if conversation else ""
                    history = qa_pairs(turns[:index - 1]) if conversation else []
                    return record, Asked(question, history, {}, turn.region, turn.window, turn.text, key,
                                         self._settings.evidence_samples)
        raise Med3DVLMError("That answer is no longer in the scene, so its evidence cannot be shown; ask again.")

    def _show(self, kind: str, node, record, asked: Asked, on_done, on_status):
        """An evidence map made before is shown again at once; else the server makes it."""
        made = evidence_nodes.find_evidence(record, asked.key)
        if made is None:
            return self._run(kind, node, asked, None, on_done, on_status, record)
        show_over(self.scene, node, made, evidence_nodes.OPACITY)
        self._call(on_status, Status("done", f"Shown again over the scan: {made.GetName()}."))
        self._call(on_done, Result(kind, made.GetName(), made.GetID()))
        return made

    def _run(self, kind, volume_node, asked: Asked, on_token, on_done, on_status, record=None):
        callbacks = {"token": on_token, "done": on_done, "status": on_status}
        request = self._start(kind, self._resolve(volume_node), asked, callbacks, record)
        if on_done is not None:
            return request.node
        self._link.wait(request.link_request)
        if request.exception is not None:
            raise request.exception
        if request.turns is None:  # it made a node
            return self.scene.GetNodeByID(request.result.node_id) if request.result.node_id else None
        return request.result.text if request.result.scores is None else request.result.scores

    def _resolve(self, node):
        if isinstance(node, str):
            return self.scene.GetNodeByID(node)
        return node

    def _start(self, kind: str, node, asked: Asked, callbacks: dict, record=None) -> _Request:
        if self._request is not None:
            raise BusyError(f"Med3DVLM is still working on {KINDS[self._request.kind].what}; wait for it or press Stop.")
        spec = KINDS[kind]
        if spec.role == text_nodes.CONVERSATION_ROLE and not asked.question:
            raise Med3DVLMError("The question is empty; type a question about the volume.")
        source = NodeVolume(node, self._dicom_lookup)  # VolumeError for no/2D/colour volumes, at once; no copy
        settings = self._settings
        turns = None
        if spec.role is not None:  # a chat request: its turns are written into the volume's text node
            conversation = spec.role == text_nodes.CONVERSATION_ROLE
            record = text_nodes.active_conversation(self.scene, node) if conversation else None
            if record is None:
                record = text_nodes.create_record(self.scene, node, spec.role, settings.model)
            earlier = text_nodes.get_turns(record)
            asked = replace(asked, history=qa_pairs(earlier))
            turns = earlier + [Turn("user", asked.question or spec.label, now()),
                               Turn("model", "", now(), region=asked.region, window=asked.window)]
            text_nodes.set_turns(record, turns, status="generating")
        request = _Request(kind, node, record, turns, asked, callbacks, settings.max_new_tokens, settings.model)
        request.server_key = self._server_key
        self._request = request
        request.link_request = self._link.submit(Request(
            source, lambda server, digest, on_event: spec.job(server, digest, asked, on_event),
            lambda event, value: self._on_event(request, event, value)))
        return request

    # ----- events, on the main thread -----------------------------------------------------------
    def _on_event(self, request: _Request, event: str, payload) -> None:
        if event == "status":
            if payload["stage"] == "generating" and not request.started:
                request.started = time.monotonic()
            self._notify(request, self._status(request, payload["stage"], payload))
        elif event == "token":
            request.tokens = payload["n"]
            request.last_token = time.monotonic()
            request.turns[-1].text += payload["text"]
            self._write(request, "generating")
            self._call(request.callbacks["token"], payload["text"])
            self._notify(request, self._status(request, "generating"))
        elif event == "done":
            self._finish(request, payload)
        elif event == "error":
            self._fail(request, payload)

    def _status(self, request: _Request, stage: str, event: dict | None = None) -> Status:
        """The status line for ``stage``; ``event``: the server's status event (place in line, passes)."""
        event = event or {}
        position, done, total = event.get("position", 0), event.get("done", 0), event.get("total", 0)
        end = request.last_token if stage in ("done", "stopped") else time.monotonic()
        elapsed = max(0.0, end - request.started) if request.started else 0.0
        rate = request.tokens / elapsed if elapsed > 0 else 0.0
        where = f"on {self._settings.server}" if self._settings.server else self._settings.model
        messages = {
            "starting": "Starting the model server…",
            "loading": f"Loading model {where}…",
            "queued": f"Waiting for the model: {position} request{'s' * (position > 1)} ahead…",
            "encoding": "Encoding the volume…",
            "generating": f"Generating: {request.tokens} tokens, {rate:.1f} tok/s",
            "done": f"Done: {request.tokens} tokens in {elapsed:.1f} s ({rate:.1f} tok/s)",
            "stopped": f"Stopped after {request.tokens} tokens.",
            "explaining": f"Finding the evidence: pass {done} of {total}…" if total else "Finding the evidence…",
            "preprocessing": "Preparing what the model is shown…",
        }
        spec = KINDS[request.kind]
        if spec.working:
            messages.update(generating=spec.working, done=spec.ready)
        if spec.role is None:
            messages.update(done=spec.ready, stopped=f"Stopped; {spec.what} was not made.")
        if stage == "explaining":
            return Status(stage, messages[stage], done, total)
        return Status(stage, messages[stage], request.tokens, request.max_tokens)

    def _finish(self, request: _Request, final: dict) -> None:
        """The server's ``done`` event: the text (or scores), whether it was stopped, which model."""
        stopped = bool(final.get("stopped"))
        request.result.stopped, request.result.warnings = stopped, list(final.get("warnings", []))
        if final.get("model"):
            self.loaded_model, self._loaded_key = describe_model(final["model"], self._link.remote), request.server_key
        finish = KINDS[request.kind].finish
        value = finish(self.scene, request, final) if finish is not None else final.get("text", "")
        stage = "stopped" if stopped else "done"
        if request.turns is None:  # it made nodes (``finish`` did), not text
            request.result.text = value
            self._end(request, self._status(request, stage))
            return
        text = request.result.text = request.turns[-1].text = value or request.turns[-1].text
        if stopped and not text:  # stopped before any output: nothing worth keeping
            if not request.detached:
                self._discard(request)
        else:
            request.turns[-1].note = "stopped" if stopped else ""
            self._write(request, "stopped" if stopped else "complete")
            if not request.detached and self.scene.IsNodePresent(request.node):
                text_nodes.set_provenance(request.node, final.get("provenance"))
        self._end(request, self._status(request, stage))

    def _fail(self, request: _Request, error: BaseException) -> None:
        message = user_message(error, request.kind)
        if not isinstance(error, (Med3DVLMError, MemoryError)):
            log.error("Med3DVLM: %s", message, exc_info=error)
        request.exception = error if isinstance(error, Med3DVLMError) else Med3DVLMError(message)
        request.result.error = message
        request.result.restart = isinstance(error, ServerFailure)
        if request.turns is None:  # it makes nodes: none was made
            pass
        elif request.turns[-1].text:  # keep what was generated, marked as failed
            request.turns[-1].note = "failed"
            self._write(request, "failed")
        elif not request.detached:  # nothing to keep: undo the request in the scene
            self._discard(request)
        self._end(request, Status("failed", message))

    def _discard(self, request: _Request) -> None:
        remaining = request.turns[:-2]
        if remaining and self.scene.IsNodePresent(request.node):
            text_nodes.set_turns(request.node, remaining, status="complete")
        elif self.scene.IsNodePresent(request.node):
            self.scene.RemoveNode(request.node)
        request.result.node_id = None

    def _end(self, request: _Request, status: Status) -> None:
        if self._request is request:
            self._request = None
        self._notify(request, status)
        self._call(request.callbacks["done"], request.result)

    def _write(self, request: _Request, status: str) -> None:
        if request.turns is not None and not request.detached and self.scene.IsNodePresent(request.node):
            text_nodes.set_turns(request.node, request.turns, status=status)

    def _notify(self, request: _Request, status: Status) -> None:
        self._call(request.callbacks["status"], status)

    @staticmethod
    def _call(callback, *args) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a broken callback must not break streaming into the scene
            log.exception("Med3DVLM: a callback failed")

    # ----- scene ------------------------------------------------------------------------------
    def _on_scene_start_close(self, caller=None, event=None) -> None:
        if self._request is not None:
            self._request.detached = True
            self._link.cancel()

    def _on_scene_changed(self, caller=None, event=None) -> None:
        for listener in list(self._volume_listeners):
            self._call(listener)

    def add_volumes_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when nodes are added to or removed from the scene."""
        self._volume_listeners.append(listener)

    def volume_choices(self) -> list[tuple[str, str]]:
        """(node ID, name) of the image volumes in the scene (label maps, evidence maps and model
        views excluded: they are not scans to ask about)."""
        return [(n.GetID(), n.GetName()) for n in self._nodes("vtkMRMLScalarVolumeNode")
                if not n.IsA("vtkMRMLLabelMapVolumeNode") and n.GetAttribute(OVERLAY) is None]

    def region_choices(self) -> list[tuple[str, str]]:
        """(node ID, name) of the Markups ROI nodes a question can be about (model input boxes excluded)."""
        return [(n.GetID(), n.GetName()) for n in self._nodes("vtkMRMLMarkupsROINode") if n.GetAttribute(OVERLAY) is None]

    def _nodes(self, class_name: str) -> list:
        nodes = self.scene.GetNodesByClass(class_name)
        return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]

    def volume_name(self, volume_node) -> str:
        node = self._resolve(volume_node)
        return node.GetName() if node is not None else "no volume"

    def session_turns(self, volume_node) -> list[Turn]:
        """The turns shown in the chat for a volume: reports, findings and the current conversation."""
        node = self._resolve(volume_node)
        return text_nodes.session_turns(self.scene, node) if node is not None else []

    def clear_session(self, volume_node) -> None:
        """Start a fresh chat for the volume; earlier records stay in the scene (archived)."""
        if self._request is not None:
            raise BusyError("Med3DVLM is still answering; press Stop before clearing the chat.")
        node = self._resolve(volume_node)
        if node is not None:
            text_nodes.archive_session(self.scene, node)

    def abnormality_scores(self, volume_node) -> score_table.StoredScores | None:
        """The volume's latest abnormality scores as stored in its table node, or None."""
        node = self._resolve(volume_node)
        table = score_table.find_table(self.scene, node) if node is not None else None
        return score_table.read_scores(table) if table is not None else None

    def records(self, volume_node, role: str | None = None, include_archived: bool = True) -> list:
        """The volume's text nodes (reports, conversations, findings), oldest first."""
        return text_nodes.records(self.scene, self._resolve(volume_node), role, include_archived)
