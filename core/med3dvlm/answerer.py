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

TokenCallback = Callable[[str], None]


class Answerer(Protocol):
    model_name: str

    def describe(self) -> dict:
        """What answers: ``name``, ``device``, ``dtype``, ``quantization`` (None or '4bit'/'8bit') and
        ``capabilities`` (of report, ask, detect, retrieve)."""

    def encode(self, volume) -> Any:
        """Get a volume ready for questions (its image tokens, or its upload to the server)."""

    def report(self, volume, *, instruction: str = ..., on_token: TokenCallback | None = None,
               cancel: CancelToken | None = None, **settings) -> str: ...

    def ask(self, volume, question: str, *, history: Sequence[tuple[str, str]] = (),
            choices: Sequence[str] | None = None, on_token: TokenCallback | None = None,
            cancel: CancelToken | None = None, **settings) -> str: ...

    def stream_report(self, volume, **kwargs) -> Iterator[str]: ...

    def stream_ask(self, volume, question: str, **kwargs) -> Iterator[str]: ...

    def report_batch(self, volumes: Sequence, *, batch_size: int = ..., progress: Callable[[int], None] | None = None,
                     **settings) -> list[str]: ...

    def detect(self, volume_or_study) -> DetectionResult: ...

    def retrieve(self, volume, texts: Sequence[str]) -> list[tuple[int, float]]: ...

    def provenance(self, task: str, volume=None, **settings) -> dict:
        """What produced (or produces) the answer to ``task`` about ``volume`` with ``settings``: model,
        weights, device, preprocessing, generation (see :func:`med3dvlm.provenance.record`)."""
