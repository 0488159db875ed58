"""A small deterministic stand-in for ``med3dvlm.pipeline.Pipeline`` (same calling contract).

It streams words with a short sleep per token (or, with ``spin=True``, a pure-Python busy loop
that holds the GIL like a model's Python-side work), honours ``cancel`` within one token, and
knows a volume it met before by its digest, as the real one does. It runs behind a real model server process
(standin_server.py), which the Slicer tests start through ``server_process.standin_command``.
"""

from __future__ import annotations

import os
import time

from med3dvlm.detection_result import DetectionResult, LabelScore
from med3dvlm.errors import Med3DVLMError, ModelError, VolumeError
from med3dvlm.provenance import record
from med3dvlm.readers import as_volume
from med3dvlm.volume_cache import known_volumes

WORDS = ("no", "focal", "lesion", "is", "seen", "in", "the", "liver", "spleen", "or", "kidneys")


class StandInPipeline:
    weights = None  # no weight files: no digest

    def __init__(self, model_name: str = "stand-in", token_delay: float = 0.002, report_words: int = 24,
                 scores: dict[tuple[str, str], float | list] | None = None, spin: bool = False,
                 die_after: int | None = None) -> None:
        self.model_name = model_name
        self.die_after = die_after  # tokens after which the process dies, as a crashing server would
        self.token_delay = token_delay
        self.spin = spin
        self.report_words = report_words
        self.scores = scores
        self.generate_kwargs: list[dict] = []

    def describe(self) -> dict:
        return {"name": self.model_name, "device": "cpu", "dtype": "float32", "quantization": None,
                "capabilities": ["report", "ask"] + ["detect"] * (self.scores is not None)}

    def encode(self, volume) -> str:
        return known_volumes.digest(volume, as_volume)[0]

    def provenance(self, task, volume=None, **settings) -> dict:
        """The real pipeline's record (provenance.record), with the stand-in's values."""
        members = [] if volume is None else list(volume.values()) if isinstance(volume, dict) else \
            volume if isinstance(volume, list) else [volume]
        generation = {"max_new_tokens": settings.get("max_new_tokens") or len(WORDS)} if task in ("report", "ask") \
            else None
        return record(self, task, preprocessing={"preset": "stand-in", "volumes": [
            {"output_shape": list(v.shape)} for v in members]}, generation=generation)

    def report(self, volume, *, instruction=None, on_token=None, cancel=None, **gen) -> str:
        self.encode(volume)
        stats = [volume.modality, f"{volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]}",
                 f"mean={float(volume.array.mean()):.1f}"]
        words = stats + [WORDS[i % len(WORDS)] for i in range(self.report_words - len(stats))]
        return self._stream(words, on_token, cancel, gen)

    def ask(self, volume, question, *, history=(), choices=None, on_token=None, cancel=None, **gen) -> str:
        self.encode(volume)
        if not question.strip():
            raise Med3DVLMError("The question is empty; type a question about the volume.")
        words = ["Answer", f"#{len(history) + 1}:", *question.split()]
        return self._stream(words, on_token, cancel, gen)

    def detect(self, volume) -> DetectionResult:
        """``scores`` {(organ, kind): probability, or [probability, threshold]} as the real detector
        reports them; the threshold is 0.5 unless given (None: a label not called on this sequence)."""
        if self.scores is None:  # as the real pipeline of a model without a detector
            raise ModelError(f"Model {self.model_name} has no MRI abnormality detector; detection needs a "
                             "'medmap' subfolder with a MedMAP detector.")
        if volume.sequence is None:  # as the real detector: only MRI of a known sequence
            raise VolumeError(f"{volume.name} is not an MRI volume of a known sequence; detection needs MRI.")
        scores = sorted((LabelScore(organ, kind, *(p if isinstance(p, list | tuple) else (p, 0.5)))
                         for (organ, kind), p in self.scores.items()),
                        key=lambda s: -s.probability)
        return DetectionResult(scores, (volume.sequence,), {volume.sequence: 1.0}, {volume.sequence: volume.name})

    def _stream(self, words, on_token, cancel, gen) -> str:
        self.generate_kwargs.append(gen)
        pieces: list[str] = []
        for index, word in enumerate(words[: gen.get("max_new_tokens", len(words))]):
            if cancel is not None and cancel.cancelled:
                break
            self._pause()
            piece = word if index == 0 else " " + word
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)
            if self.die_after is not None and len(pieces) >= self.die_after:
                time.sleep(0.2)  # let the tokens so far reach the client
                os._exit(3)
        return "".join(pieces)


    def _pause(self) -> None:
        if not self.spin:
            time.sleep(self.token_delay)
            return
        end = time.perf_counter() + self.token_delay
        while time.perf_counter() < end:
            pass
