"""The job queue: one model, one job at a time (a GPU runs one generation at a time), the others
wait in line and are told their place.

The model is loaded by the same thread before the first job, so requests that arrive while it
loads wait in line and see a ``loading`` status. A job's events cross from that thread to the
asyncio loop of its HTTP response through ``call_soon_threadsafe``; cancelling (Stop, the client
disconnecting, or ``POST /jobs/{id}/cancel``) sets the job's CancelToken, which generation checks
at every token, and a job cancelled while waiting never runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from ..answerer import Answerer
from ..cancel import CancelToken
from ..errors import Med3DVLMError, Med3DVLMWarning

log = logging.getLogger("med3dvlm.server")
Work = Callable[[Answerer, "Job"], dict]  # (pipeline, job) -> result fields of the "done" event


class QueueFull(Med3DVLMError):
    """More jobs wait than the server accepts (HTTP 503)."""


class Job:
    def __init__(self, kind: str, work: Work) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.work = work
        self.cancel = CancelToken()
        self.position = 0  # jobs ahead of it in line
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def emit(self, event: str, **fields: Any) -> None:
        """Thread-safe: queue an event for this job's response stream."""
        self._loop.call_soon_threadsafe(self.events.put_nowait, {"event": event, **fields})


class JobQueue:
    def __init__(self, load: Callable[[], Answerer], max_waiting: int = 32) -> None:
        self.max_waiting = max_waiting
        self.pipeline: Answerer | None = None
        self.state = "loading"  # -> "ready" or "failed"
        self.load_error: str | None = None
        self._load = load
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="med3dvlm-jobs", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def model(self) -> dict | None:
        """What answers (Answerer.describe: name, device, precision...); None until loaded."""
        return self.pipeline.describe() if self.pipeline is not None else None

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"The server has {len(self._waiting)} requests waiting already; try again later.")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._place(job, len(self._waiting) - 1 + (self._running is not None))
            if self.state == "loading":
                job.emit("status", stage="loading")
            self._wake.notify()

    def cancel(self, job_id: str) -> bool:
        """Cancel a running or waiting job; False when no such job is known (already finished)."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel.cancel()
        return True

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            for job in [self._running, *self._waiting]:
                if job is not None:
                    job.cancel.cancel()
            self._wake.notify()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            self._running = self._waiting.popleft()
            if self._running.position:  # it waited: its turn now
                self._place(self._running, 0)
            for place, job in enumerate(self._waiting):  # everyone behind moves up one place
                self._place(job, place + 1)
            return self._running

    @staticmethod
    def _place(job: Job, position: int) -> None:
        job.position = position
        job.emit("queued", id=job.id, position=position)

    def _run(self) -> None:
        try:
            self.pipeline = self._load()
            self.state = "ready"
        except Exception as error:  # the server stays up and says why in every answer
            self.state = "failed"
            self.load_error = str(error) if isinstance(error, Med3DVLMError) else (
                f"The model could not be loaded ({type(error).__name__}: {error}); see the server log.")
            log.exception("loading the model failed")
        while (job := self._next()) is not None:
            try:
                self._execute(job)
            finally:
                with self._wake:
                    self._running = None
                    self._jobs.pop(job.id, None)

    def _execute(self, job: Job) -> None:
        if self.state == "failed":
            job.emit("error", message=self.load_error)
            return
        if job.cancel.cancelled:  # left the line before its turn
            job.emit("done", stopped=True)
            return
        started = time.perf_counter()
        # Process-wide, but this thread is the only one that runs model code while it is set.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = self._work(job)
        told = [str(w.message) for w in caught if issubclass(w.category, Med3DVLMWarning)]
        for w in caught:
            if not issubclass(w.category, Med3DVLMWarning):
                log.warning("%s: %s", w.category.__name__, w.message)
        if result is not None:
            seconds = round(time.perf_counter() - started, 3)
            if "provenance" in result:
                result["provenance"]["seconds"] = seconds
            job.emit("done", stopped=job.cancel.cancelled, model=self.model(), seconds=seconds,
                     **({"warnings": told} if told else {}), **result)

    def _work(self, job: Job) -> dict | None:
        """The job's result, or None when it failed (its ``error`` event is sent)."""
        try:
            return job.work(self.pipeline, job)
        except Med3DVLMError as error:
            job.emit("error", message=str(error))
        except MemoryError:
            job.emit("error", message="The server ran out of memory for this request; try a smaller volume.")
        except Exception as error:  # the traceback goes to the server log; no request content is logged
            log.exception("%s job failed", job.kind)
            job.emit("error", message=f"The server failed unexpectedly ({type(error).__name__}); "
                                      "the details are in the server's log.")
        return None
