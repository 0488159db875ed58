"""One background thread for model work, and a queue that brings its events to the main thread.

The thread only runs plain Python (the model); it never touches Qt or MRML. The job's events
(any kind it emits, then ``done`` with its return value or ``error`` with ``(exception, traceback
text)``) wait in a queue until the main thread calls :meth:`Worker.drain`: a QTimer does so every
few milliseconds while a job runs (when a Qt application exists), and :meth:`Worker.wait` does so
for blocking callers. Handlers must not raise: an exception would drop the rest of the batch.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from med3dvlm.cancel import CancelToken

Emit = Callable[[str, Any], None]
Work = Callable[[Emit, CancelToken], Any]
EventHandler = Callable[[str, Any], None]


class Job:
    """One unit of work; ``finished`` turns True on the main thread once its last event is delivered."""

    def __init__(self, work: Work, on_event: EventHandler) -> None:
        self.work = work
        self.on_event = on_event
        self.cancel = CancelToken()
        self.finished = False


class Worker:
    def __init__(self, poll_ms: int = 15) -> None:
        self.poll_ms = poll_ms
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._events: queue.Queue[tuple[Job, str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._timer = None
        self._wakeup = threading.Event()
        self._closed = False

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, work: Work, on_event: EventHandler) -> Job:
        """Run ``work(emit, cancel)`` on the worker thread; the caller checks ``busy`` first."""
        if self._closed:
            raise RuntimeError("the worker was shut down")
        if self._current is not None:
            raise RuntimeError("the worker is busy")
        job = Job(work, on_event)
        self._current = job
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="Med3DVLM worker", daemon=True)
            self._thread.start()
        self._jobs.put(job)
        self._start_timer()
        return job

    def cancel(self) -> None:
        if self._current is not None:
            self._current.cancel.cancel()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            def emit(kind: str, payload: Any = None, job: Job = job) -> None:
                self._events.put((job, kind, payload))
                self._wakeup.set()

            try:
                emit("done", job.work(emit, job.cancel))
            except BaseException as error:  # always answer, or the main thread would wait forever
                emit("error", (error, traceback.format_exc()))

    def drain(self) -> int:
        """Deliver pending events on the calling (main) thread; consecutive tokens are joined so that
        a burst costs one update. Returns the number of events delivered."""
        events: list[list] = []
        while True:
            try:
                job, kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if events and kind == "token" and events[-1][0] is job and events[-1][1] == "token":
                events[-1][2] += payload
            else:
                events.append([job, kind, payload])
        for job, kind, payload in events:
            if kind in ("done", "error"):
                job.finished = True
                if self._current is job:
                    self._current = None
                    self._stop_timer()
            job.on_event(kind, payload)
        return len(events)

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until ``job`` finished, delivering its events meanwhile; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._wakeup.wait(0.05 if remaining is None else min(0.05, remaining))
            self._wakeup.clear()
            self.drain()
        return True

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Cancel the running job, stop the thread and drop undelivered events; True if it stopped.
        The worker takes no more jobs afterwards."""
        self._closed = True
        self.cancel()
        self._stop_timer()
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)
        with self._events.mutex:
            self._events.queue.clear()
        if self._current is not None:
            self._current.finished = True
            self._current = None
        return thread is None or not thread.is_alive()

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = _make_timer(self.drain)
        if self._timer is not None:
            self._timer.start(self.poll_ms)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()


def _make_timer(callback: Callable[[], Any]):
    """A QTimer calling ``callback`` on the main thread, or None without a Qt application
    (plain Python scripts: they use the blocking calls, which drain the queue themselves)."""
    try:
        from .qtcompat import QCoreApplication, QTimer
    except ImportError:
        return None
    if QCoreApplication.instance() is None:
        return None
    timer = QTimer()
    timer.timeout.connect(callback)
    return timer
