"""A thread-safe cancellation token shared by a front end and a running generation."""

from __future__ import annotations

import threading

from .errors import Med3DVLMError


class Cancelled(Med3DVLMError):
    """Work that has no useful partial result (an evidence map) was stopped by its CancelToken."""


class CancelToken:
    """Set from any thread; generation checks it between tokens and stops within one step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
