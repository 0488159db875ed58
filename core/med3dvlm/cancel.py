"""A thread-safe cancellation token shared by a front end and a running generation."""

from __future__ import annotations

import threading


class CancelToken:
    """Set from any thread; generation checks it between tokens and stops within one step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
