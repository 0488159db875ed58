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
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .. import prompts
from ..cancel import CancelToken
from ..detection_result import DetectionResult
from ..errors import Med3DVLMError
from ..readers import file_version, read_volume
from ..volume import Volume
from . import tasks
from .transport import Server, run

TokenCallback = Callable[[str], None]


class RemotePipeline:
    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None) -> None:
        self.server = Server(url, token, ca_file)
        self._files: dict[tuple, str] = {}  # file_version -> digest
        self.last_provenance: dict | None = None  # what produced the last answer (model, weights, settings)
        self._info = self.info()

    def info(self) -> dict:
        """The server's model, device, precision, state (loading, ready, failed) and limits."""
        return run(tasks.get_json(self.server, "/info"))

    @property
    def model_name(self) -> str:
        return self._info["model"]

    def __repr__(self) -> str:
        return f"RemotePipeline({self.server.url!r}, model={self.model_name!r})"

    # ----- volumes ---------------------------------------------------------------------------
    def encode(self, volume) -> str:
        """Make sure the server has the volume (upload it once); returns its digest. The server
        encodes it with the first request about it and keeps the image tokens for the next."""
        return run(self._digest(volume))

    def _digest(self, volume):
        if isinstance(volume, (str, os.PathLike)):
            key = file_version(volume)
            digest = yield from tasks.ensure_volume(self.server, lambda: read_volume(volume), self._files.get(key))
            if key is not None:
                self._files[key] = digest
            return digest
        if isinstance(volume, tuple):
            volume = Volume(np.asarray(volume[0]), np.asarray(volume[1]))
        if not isinstance(volume, Volume):
            raise Med3DVLMError(f"Pass a Volume, a file path or (array, affine), not {type(volume).__name__}.")
        return (yield from tasks.ensure_volume(self.server, lambda: volume))

    # ----- jobs --------------------------------------------------------------------------------
    def _events(self, volume, path: str, payload: dict, cancel: CancelToken | None) -> Iterator[dict]:
        """The job's events as they arrive, ending with ``done``; Stop (``cancel``) asks the
        server to stop, and an abandoned iterator closes the connection, which stops it too."""
        pending: deque[dict] = deque()

        def task():
            if volume is not None:
                payload["volume"] = yield from self._digest(volume)
            return (yield from tasks.job(self.server, path, payload, pending.append))

        running, job_id, asked = task(), None, False
        while True:
            try:
                wait = running.send(None)
            except StopIteration as stop:
                yield from pending
                self.last_provenance = stop.value.get("provenance")
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

    def _text(self, volume, path, payload, on_token, cancel) -> str:
        final = {}
        for event in self._events(volume, path, payload, cancel):
            if event["event"] == "token" and on_token is not None:
                on_token(event["text"])
            final = event
        return final.get("text", "").strip()

    def _stream(self, volume, path, payload, cancel) -> Iterator[str]:
        for event in self._events(volume, path, payload, cancel):
            if event["event"] == "token":
                yield event["text"]

    @staticmethod
    def _ask_payload(question, history, choices, settings) -> dict:
        return {"question": question, "history": [list(turn) for turn in history],
                "choices": list(choices) if choices else None, "generation": settings}

    def report(self, volume, *, instruction: str = prompts.REPORT_PROMPT, on_token: TokenCallback | None = None,
               cancel: CancelToken | None = None, **settings) -> str:
        return self._text(volume, "/report", {"instruction": instruction, "generation": settings}, on_token, cancel)

    def ask(self, volume, question: str, *, history: Sequence[tuple[str, str]] = (),
            choices: Sequence[str] | None = None, on_token: TokenCallback | None = None,
            cancel: CancelToken | None = None, **settings) -> str:
        if not (question or "").strip():
            raise Med3DVLMError("The question is empty; type a question about the volume.")
        return self._text(volume, "/ask", self._ask_payload(question, history, choices, settings), on_token, cancel)

    def stream_report(self, volume, *, instruction: str = prompts.REPORT_PROMPT, cancel=None, **settings):
        return self._stream(volume, "/report", {"instruction": instruction, "generation": settings}, cancel)

    def stream_ask(self, volume, question: str, *, history=(), choices=None, cancel=None, **settings):
        return self._stream(volume, "/ask", self._ask_payload(question, history, choices, settings), cancel)

    def report_batch(self, volumes: Sequence, *, batch_size: int = 1, progress: Callable[[int], None] | None = None,
                     **settings) -> list[str]:
        """Reports one volume at a time (the server batches nothing across requests)."""
        reports = []
        for volume in volumes:
            reports.append(self.report(volume, **settings))
            if progress is not None:
                progress(1)
        return reports

    def detect(self, volume_or_study) -> DetectionResult:
        """MRI abnormality scores for a volume, a list of volumes or a ``{sequence: volume}`` study."""
        if isinstance(volume_or_study, dict):
            sequences, volumes = list(volume_or_study), list(volume_or_study.values())
        else:
            sequences = None
            volumes = volume_or_study if isinstance(volume_or_study, list) else [volume_or_study]
        digests = [run(self._digest(volume)) for volume in volumes]
        final = {}
        for final in self._events(None, "/detect", {"volumes": digests, "sequences": sequences}, None):
            pass
        return DetectionResult.from_dict(final["detection"])

    def retrieve(self, volume, texts: Sequence[str]) -> list[tuple[int, float]]:
        final = {}
        for final in self._events(volume, "/retrieve", {"texts": list(texts)}, None):
            pass
        return [(int(index), float(score)) for index, score in final["ranking"]]


def connect(url: str, token: str | None = None, ca_file: str | None = None) -> RemotePipeline:
    """A client of the model server at ``url``; ``token`` defaults to $MED3DVLM_TOKEN."""
    return RemotePipeline(url, token if token is not None else os.environ.get("MED3DVLM_TOKEN") or None, ca_file)
