"""Requests to the model server, driven by a QTimer on Slicer's main thread: no Python thread.

Inside Slicer, PythonQt keeps the GIL on the main thread while the event loop idles, so a Python
worker thread would barely run. Here nothing needs one: the model runs in the server process,
and each timer tick advances the request's task (:mod:`med3dvlm.client.transport`) for a few
milliseconds: starting the local server, hashing the volume a chunk at a time while it starts,
sending it a chunk at a time, then reading whatever tokens the socket holds. Events reach the
request's handler on the main thread: ``status`` (stage: starting, loading, queued, encoding,
generating; ``position`` when queued), ``token`` (``text``: what came during the tick, ``n``:
tokens so far), then ``done`` (the server's final event) or ``error`` (the exception).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from med3dvlm.client import tasks
from med3dvlm.client.transport import ConnectionLost, Pause, Server, advance
from med3dvlm.errors import Med3DVLMError
from med3dvlm.volume_cache import KnownVolumes

from .local_server import LocalServer, ServerFailure
from .settings import Settings

EventHandler = Callable[[str, Any], None]
Job = Callable[[Server, str, tasks.EventCallback], Any]  # (server, digest, on_event) -> a job task of client.tasks
TICK_BUDGET = 0.008  # seconds of work per tick: the main thread stays free for rendering


class Request:
    """What to ask (``job``) about which volume (``source``, a ``tasks.VolumeSource``), and where
    events go; ``finished`` turns True on the main thread once ``done`` or ``error`` is delivered."""

    def __init__(self, source: tasks.VolumeSource, job: Job, on_event: EventHandler) -> None:
        self.source, self.job, self.on_event = source, job, on_event
        self.job_id: str | None = None
        self.stop_requested = False
        self.finished = False
        self.task = None
        self.text: list[str] = []  # tokens that came during this tick, delivered together
        self.tokens = 0


class ServerLink:
    def __init__(self, local: LocalServer | None = None, poll_ms: int = 15) -> None:
        self.local = local or LocalServer()
        self.poll_ms = poll_ms
        self.remote: Server | None = None  # None: the local server
        self.settings = Settings()
        self._known = KnownVolumes()  # volume node state -> digest
        self._current: Request | None = None
        self._side_tasks: list = []  # cancel requests, advanced alongside
        self._pending: tuple | None = None  # settings changed while a request ran
        self._timer = None

    @property
    def busy(self) -> bool:
        return self._current is not None

    def configure(self, settings: Settings, remote: Server | None) -> None:
        """Settings for the next request; a change of model or server stops the local server (after
        the running request, which keeps the server it started with)."""
        if self._current is not None:
            self._pending = (settings, remote)
            return
        if (settings.load_key, remote) != (self.settings.load_key, self.remote):
            self.local.stop()
        self.settings, self.remote = settings, remote

    def submit(self, request: Request) -> Request:
        if self._current is not None:
            raise RuntimeError("a request is running")
        request.task = self._run(request)
        self._current = request
        self._start_timer()
        return request

    def cancel(self) -> None:
        """Stop the running request: the server stops within a token and answers ``done`` with
        what it had; before the job reached the server, the request simply ends."""
        request = self._current
        if request is None or request.stop_requested:
            return
        request.stop_requested = True
        if request.job_id is not None:
            try:
                self._side_tasks.append(tasks.cancel_job(self._server_now(), request.job_id))
            except Med3DVLMError:
                pass  # the server is gone: the job's own stream says so
        else:
            request.task.close()  # closes its connection: a job already posted is cancelled by the server
            self._finish(request, "done", {"event": "done", "stopped": True})

    def pump(self) -> None:
        """One tick: advance the request (and any cancel) for a few milliseconds."""
        for side in list(self._side_tasks):
            try:
                if advance(side, TICK_BUDGET)[0]:
                    self._side_tasks.remove(side)
            except Med3DVLMError:
                self._side_tasks.remove(side)  # the job stream itself reports what went wrong
        request = self._current
        if request is not None:
            try:
                finished, value = advance(request.task, TICK_BUDGET)
            except Exception as error:  # delivered, never raised into Qt's event loop
                self._finish(request, "error", self._explain(error))
            else:
                if finished:
                    self._finish(request, "done", value)
                else:
                    self._deliver_tokens(request)
        if self._current is None and not self._side_tasks:
            self._stop_timer()

    def wait(self, request: Request, timeout: float | None = None) -> bool:
        """Block until ``request`` finished (the Python console's blocking calls); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.pump()
            time.sleep(0.002)
        return True

    def restart(self) -> None:
        """After a failure: a fresh local server (started now, to be ready sooner), or a reconnect."""
        self.local.stop()
        if self.remote is None:
            self.local.start(self.settings)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._current is not None:
            self._current.task.close()
            self._current.finished = True
            self._current = None
        self._stop_timer()
        self.local.stop(wait=timeout)

    # ----- the request's task -------------------------------------------------------------------
    def _run(self, request: Request):
        if self.remote is None and not self.local.running:
            request.on_event("status", {"stage": "starting"})
            self.local.start(self.settings)
        try:
            yield from tasks.digest_of(request.source, self._known)  # while the server starts
        except tasks.VolumeChanged:
            pass  # edited meanwhile: send_volume reads it again
        while (server := self.remote or self.local.poll()) is None:  # the local server is starting
            yield Pause()
        digest = yield from tasks.send_volume(server, request.source, self._known)
        return (yield from request.job(server, digest, lambda event: self._on_stream(request, event)))

    def _server_now(self) -> Server:
        return self.remote or self.local.poll()

    def _on_stream(self, request: Request, event: dict) -> None:
        kind = event["event"]
        if kind == "queued":
            request.job_id = event["id"]
            if event["position"]:
                request.on_event("status", {"stage": "queued", "position": event["position"]})
        elif kind == "status":
            request.on_event("status", event)
        elif kind == "token":
            request.text.append(event["text"])
            request.tokens = event["n"]

    def _deliver_tokens(self, request: Request) -> None:
        """One ``token`` event per tick, whatever came: the panel and the text node are then
        updated once a tick, not once a token (a burst after a stall would hold the main thread)."""
        if request.text:
            text, request.text = "".join(request.text), []
            request.on_event("token", {"text": text, "n": request.tokens})

    def _explain(self, error: Exception) -> Exception:
        """A lost connection to the local server: say whether the server process died."""
        if isinstance(error, ConnectionLost) and self.remote is None and self.local.process is not None \
                and self.local.process.poll() is not None:
            return ServerFailure(self.local.exit_message())
        if isinstance(error, ConnectionLost):
            return ServerFailure(f"{str(error).rstrip('.')}; press Restart to reconnect.")
        return error

    def _finish(self, request: Request, kind: str, payload) -> None:
        self._deliver_tokens(request)
        if self._current is request:
            self._current = None
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self.configure(*pending)
        request.finished = True
        request.on_event(kind, payload)

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = _make_timer(self.pump)
        if self._timer is not None:
            self._timer.start(self.poll_ms)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()


def _make_timer(callback: Callable[[], Any]):
    """A QTimer calling ``callback`` on the main thread, or None without a Qt application
    (plain Python scripts use the blocking calls, which pump themselves)."""
    try:
        from .qtcompat import QCoreApplication, QTimer
    except ImportError:
        return None
    if QCoreApplication.instance() is None:
        return None
    timer = QTimer()
    timer.timeout.connect(callback)
    return timer

