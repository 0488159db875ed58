"""What answers questions about volumes: the in-process :class:`~med3dvlm.pipeline.Pipeline`, or a
:class:`~med3dvlm.client.remote.RemotePipeline` to a model server. The CLI and the server's jobs
are written against this protocol, so either serves them.

A volume is a :class:`~med3dvlm.volume.Volume`, a file path or an ``(array, affine)`` pair; a study
for ``detect`` a list of volumes or a ``{sequence: volume}`` mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from .cancel import CancelToken
from .detection_result import DetectionResult
from .explained import Evidence, ModelView

TokenCallback = Callable[[str], None]


class Answerer(Protocol):
    model_name: str

    def describe(self) -> dict:
        """What answers: ``name``, ``device``, ``dtype``, ``quantization`` (None or '4bit'/'8bit') and
        ``capabilities`` (of report, ask, explain, view, detect, retrieve)."""

    def encode(self, volume) -> Any:
        """Get a volume ready for questions (its image tokens, or its upload to the server)."""

    def report(self, volume, *, instruction: str = ..., on_token: TokenCallback | None = None,
               cancel: CancelToken | None = None, region=None, window=None, **settings) -> str:
        """A report of the volume, or of ``region`` (two opposite corners in RAS mm) shown in ``window``
        ((centre, width) of a CT window in place of the preset's)."""

    def ask(self, volume, question: str, *, history: Sequence[tuple[str, str]] = (),
            choices: Sequence[str] | None = None, on_token: TokenCallback | None = None,
            cancel: CancelToken | None = None, region=None, window=None, **settings) -> str: ...

    def stream_report(self, volume, **kwargs) -> Iterator[str]: ...

    def stream_ask(self, volume, question: str, **kwargs) -> Iterator[str]: ...

    def report_batch(self, volumes: Sequence, *, batch_size: int = ..., progress: Callable[[int], None] | None = None,
                     **settings) -> list[str]: ...

    def detect(self, volume_or_study, region=None) -> DetectionResult: ...

    def retrieve(self, volume, texts: Sequence[str]) -> list[tuple[int, float]]: ...

    def explain(self, volume, question: str | None = None, answer: str | None = None, region=None, *,
                window=None, choices: Sequence[str] | None = None, history: Sequence[tuple[str, str]] = (),
                method: str = ..., samples: int = ..., cancel: CancelToken | None = None) -> Evidence:
        """Where in the volume an answer (or the report) came from: an evidence map on its grid."""

    def explain_detection(self, volume_or_study, label: str, region=None, *, method: str = ..., samples: int = ...,
                          cancel: CancelToken | None = None) -> dict[str, Evidence]: ...

    def model_view(self, volume, region=None, window=None) -> ModelView:
        """What the model receives from the volume, placed over the scan."""

    def provenance(self, task: str, volume=None, **settings) -> dict:
        """What produced (or produces) the answer to ``task`` about ``volume`` with ``settings``: model,
        weights, device, preprocessing, generation (see :func:`med3dvlm.provenance.record`)."""
