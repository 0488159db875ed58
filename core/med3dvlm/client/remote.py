"""``med3dvlm.connect``: a model server behind the in-process pipeline's methods.

    >>> client = med3dvlm.connect("http://gpu-box:8000", token="...")
    >>> client.report("scan.nii.gz")
    >>> for piece in client.stream_ask("scan.nii.gz", "Is there a cyst?"):
    ...     print(piece, end="")

A volume is uploaded once per server and named by its content digest afterwards; a file path
asked about again (same size and modification time) is not even read again.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from .. import prompts
from ..answerer import TokenCallback
from ..cancel import Cancelled, CancelToken
from ..detection_result import DetectionResult
from ..errors import Med3DVLMError
from ..explained import Evidence, ModelView
from ..readers import as_volume
from ..volume import Volume
from ..volume_cache import known_volumes
from . import tasks
from .transport import Server, run

Job = Callable[[list[str], tasks.EventCallback], object]  # (digests, on_event) -> the job's task


class RemotePipeline:
    """The methods of :class:`med3dvlm.answerer.Answerer`, answered by a model server."""

    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None) -> None:
        self.server = Server(url, token, ca_file)
        self.last_provenance: dict | None = None  # what produced the last answer (model, weights, settings)
        self._info = self.info()

    def info(self) -> dict:
        """The server's model, device, precision, state (loading, ready, failed) and limits."""
        return run(tasks.info(self.server))

    @property
    def model_name(self) -> str:
        return self._info["model"]

    def describe(self) -> dict:
        self._info = self.info()
        return {"name": self.model_name, **{key: self._info.get(key) for key in
                                            ("device", "dtype", "quantization", "capabilities")}}

    def __repr__(self) -> str:
        return f"RemotePipeline({self.server.url!r}, model={self.model_name!r})"

    def provenance(self, task: str, volume=None, **settings) -> dict:
        """What produced the last answer, as the server recorded it with that answer (so ``task``,
        ``volume`` and ``settings`` are those of the last request; the server's time included)."""
        if self.last_provenance is None:
            raise Med3DVLMError("The server has not answered this client yet; its record comes with each answer.")
        return self.last_provenance

    # ----- volumes ---------------------------------------------------------------------------
    def encode(self, volume) -> str:
        """Make sure the server has the volume (upload it once); returns its digest. The server
        encodes it with the first request about it and keeps the image tokens for the next."""
        return run(self._send(volume))

    def _send(self, volume):
        if not isinstance(volume, (str, os.PathLike, tuple, Volume)):
            raise Med3DVLMError(f"Pass a Volume, a file path or (array, affine), not {type(volume).__name__}.")
        return (yield from tasks.send_volume(self.server, tasks.Loaded(volume, as_volume), known_volumes))

    # ----- jobs --------------------------------------------------------------------------------
    def _events(self, volumes: list, job: Job, cancel: CancelToken | None) -> Iterator[dict]:
        """The job's events about ``volumes`` (sent first, unless the server has them) as they
        arrive, ending with ``done``; Stop (``cancel``) asks the server to stop, and an abandoned
        iterator closes the connection, which stops it too."""
        pending: deque[dict] = deque()

        def task():
            digests = []
            for volume in volumes:
                digests.append((yield from self._send(volume)))
            return (yield from job(digests, pending.append))

        running, job_id, asked = task(), None, False
        while True:
            try:
                wait = running.send(None)
            except StopIteration as stop:
                yield from pending
                self.last_provenance = stop.value.get("provenance")
                for message in stop.value.get("warnings", ()):
                    warnings.warn(message, ServerWarning, stacklevel=4)
                yield stop.value
                return
            while pending:
                event = pending.popleft()
                job_id = event.get("id", job_id)
                yield event
            if cancel is not None and cancel.cancelled and job_id and not asked:
                asked = True
                run(tasks.cancel_job(self.server, job_id))
            if wait is not None:
                wait.ready(0.05)

    def _text(self, volume, job: Job, on_token: TokenCallback | None, cancel) -> str:
        final = {}
        for event in self._events([volume], job, cancel):
            if event["event"] == "token" and on_token is not None:
                on_token(event["text"])
            final = event
        return final.get("text", "").strip()

    def _stream(self, volume, job: Job, cancel) -> Iterator[str]:
        for event in self._events([volume], job, cancel):
            if event["event"] == "token":
                yield event["text"]

    def _final(self, volumes: list, job: Job, cancel: CancelToken | None = None) -> dict:
        final = {}
        for final in self._events(volumes, job, cancel):
            pass
        return final

    def _report(self, instruction: str, settings: dict, region, window) -> Job:
        return lambda digests, on_event: tasks.report(self.server, digests[0], on_event, instruction=instruction,
                                                      generation=settings, region=region, window=window)

    def _ask(self, question: str, history, choices, settings: dict, region, window) -> Job:
        if not (question or "").strip():
            raise Med3DVLMError("The question is empty; type a question about the volume.")
        return lambda digests, on_event: tasks.ask(self.server, digests[0], question, on_event, history=history,
                                                   choices=choices, generation=settings, region=region, window=window)

    def report(self, volume, *, instruction: str = prompts.REPORT_PROMPT, on_token: TokenCallback | None = None,
               cancel: CancelToken | None = None, region=None, window=None, **settings) -> str:
        return self._text(volume, self._report(instruction, settings, region, window), on_token, cancel)

    def ask(self, volume, question: str, *, history: Sequence[tuple[str, str]] = (),
            choices: Sequence[str] | None = None, on_token: TokenCallback | None = None,
            cancel: CancelToken | None = None, region=None, window=None, **settings) -> str:
        return self._text(volume, self._ask(question, history, choices, settings, region, window), on_token, cancel)

    def stream_report(self, volume, *, instruction: str = prompts.REPORT_PROMPT, cancel=None, region=None,
                      window=None, **settings):
        return self._stream(volume, self._report(instruction, settings, region, window), cancel)

    def stream_ask(self, volume, question: str, *, history=(), choices=None, cancel=None, region=None, window=None,
                   **settings):
        return self._stream(volume, self._ask(question, history, choices, settings, region, window), cancel)

    def report_batch(self, volumes: Sequence, *, batch_size: int = 1, progress: Callable[[int], None] | None = None,
                     **settings) -> list[str]:
        """Reports one volume at a time (the server batches nothing across requests)."""
        reports = []
        for volume in volumes:
            reports.append(self.report(volume, **settings))
            if progress is not None:
                progress(1)
        return reports

    def detect(self, volume_or_study, region=None) -> DetectionResult:
        """MRI abnormality scores for a volume, a list of volumes or a ``{sequence: volume}`` study
        (or for ``region`` of it: two opposite corners in RAS mm)."""
        sequences, volumes = _study(volume_or_study)
        final = self._final(volumes, lambda digests, on_event: tasks.detect(self.server, digests, on_event,
                                                                            sequences=sequences, region=region))
        return DetectionResult.from_dict(final["detection"])

    def retrieve(self, volume, texts: Sequence[str]) -> list[tuple[int, float]]:
        final = self._final([volume], lambda digests, on_event: tasks.retrieve(self.server, digests[0], texts,
                                                                               on_event))
        return [(int(index), float(score)) for index, score in final["ranking"]]

    # ----- what the model saw, and where its answers came from -------------------------------------
    def explain(self, volume, question: str | None = None, answer: str | None = None, region=None, *, window=None,
                choices: Sequence[str] | None = None, history: Sequence[tuple[str, str]] = (),
                method: str = "smoothgrad", samples: int = 8, cancel: CancelToken | None = None) -> Evidence:
        """As ``Pipeline.explain``: the evidence map of an answer (or of the report), made by the
        server and downloaded, on the volume's own grid. Stopped by ``cancel``: Cancelled."""
        final = self._final([volume], lambda digests, on_event: tasks.explain(
            self.server, digests[0], on_event, question=question, answer=answer, history=history, choices=choices,
            region=region, window=window, method=method, samples=samples), cancel)
        return _evidence(_found(final))

    def explain_detection(self, volume_or_study, label: str, region=None, *, method: str = "smoothgrad",
                          samples: int = 8, cancel: CancelToken | None = None) -> dict[str, Evidence]:
        """As ``Pipeline.explain_detection``: one abnormality score's evidence, a map per sequence."""
        sequences, volumes = _study(volume_or_study)
        final = self._final(volumes, lambda digests, on_event: tasks.explain_score(
            self.server, digests, label, on_event, sequences=sequences, region=region, method=method,
            samples=samples), cancel)
        return {sequence: _evidence(found) for sequence, found in _found(final).items()}

    def model_view(self, volume, region=None, window=None) -> ModelView:
        """As ``Pipeline.model_view``: what the server's model receives from the volume, over the scan."""
        final = self._final([volume], lambda digests, on_event: tasks.view(self.server, digests[0], on_event,
                                                                           region=region, window=window))
        return ModelView.from_dict(final["view"], final["view"]["volume"])


class ServerWarning(UserWarning):
    """The server made an answer otherwise than its model was trained or asked (a CT window of the
    client's, earlier turns left out of the prompt): its sentence."""


def _study(volume_or_study) -> tuple[list[str] | None, list]:
    """(sequences or None, volumes) of a volume, a list or a {sequence: volume} study."""
    if isinstance(volume_or_study, dict):
        return list(volume_or_study), list(volume_or_study.values())
    return None, volume_or_study if isinstance(volume_or_study, list) else [volume_or_study]


def _found(final: dict) -> dict:
    if "evidence" not in final:  # the server answered "done" without it: it was stopped
        raise Cancelled("The evidence map was stopped before it was complete.")
    return final["evidence"]


def _evidence(found: dict) -> Evidence:
    return Evidence.from_dict(found, found["map"])


def connect(url: str, token: str | None = None, ca_file: str | None = None) -> RemotePipeline:
    """A client of the model server at ``url``; ``token`` defaults to $MED3DVLM_TOKEN."""
    return RemotePipeline(url, token if token is not None else os.environ.get("MED3DVLM_TOKEN") or None, ca_file)
