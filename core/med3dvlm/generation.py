"""Generation settings, token streaming and cancellation hooks for transformers' `generate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .cancel import CancelToken


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0

    def updated(self, **overrides) -> "GenerationSettings":
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise TypeError(f"unknown generation settings: {sorted(unknown)}; known: {sorted(asdict(self))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


# Reports are long; answers are short. Greedy by default: a reading aid should be reproducible.
REPORT_SETTINGS = GenerationSettings(max_new_tokens=256)
ANSWER_SETTINGS = GenerationSettings(max_new_tokens=64)


class CallbackStreamer(BaseStreamer):
    """Decodes new tokens incrementally and calls ``on_text(piece)`` for each printable piece.

    Decoding the whole sequence each time and emitting the new suffix keeps multi-byte characters
    and word-initial spaces (byte-level BPE) intact; a trailing U+FFFD waits for the next token.
    Leading whitespace (answers follow the prompt after a space) is not emitted, so the pieces add
    up to the stripped text the pipeline returns.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids (empty with inputs_embeds)
            self.prompt_seen = True
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return
        piece, self.emitted = text[len(self.emitted):], text
        if piece:
            self.on_text(piece)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        if len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
            self.emitted = text


class StopOnCancel(StoppingCriteria):
    """Ends generation at the next step once the token is cancelled."""

    def __init__(self, token: CancelToken) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.token.cancelled, dtype=torch.bool, device=input_ids.device)


def stopping_criteria(cancel: CancelToken | None) -> StoppingCriteriaList:
    return StoppingCriteriaList([StopOnCancel(cancel)] if cancel is not None else [])
