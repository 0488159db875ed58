"""Conversation turns, the unit shown in the chat panel and stored in text nodes (no Qt, no MRML)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

ROLE_TITLES = {"user": "You", "model": "Med3DVLM", "error": "Error", "warning": "Note"}


def now() -> str:
    """Local time, ISO 8601 to the millisecond: sortable, and readable in the saved scene."""
    return datetime.now().isoformat(timespec="milliseconds")


@dataclass
class Turn:
    role: str  # "user", "model", "error" or "warning" (the last two are shown, never stored)
    text: str
    time: str
    note: str = ""  # "stopped" when the user stopped the answer
    region: list[list[float]] | None = None  # an answer about a region: two opposite corners, RAS mm
    window: list[float] | None = None  # an answer about the volume in a CT window of the user's: centre, width

    @property
    def framing(self) -> str:
        """'region R -100…50, A -80…60, S -250…-150 mm; window L60/W300': what the answer was about,
        beyond the whole volume as the model was trained to see it ("" for that)."""
        parts = []
        if self.region:
            parts.append("region " + ", ".join(f"{'RAS'[a]} {min(c[a] for c in self.region):g}…"
                                                f"{max(c[a] for c in self.region):g}" for a in range(3)) + " mm")
        if self.window:
            parts.append(f"window L{self.window[0]:g}/W{self.window[1]:g}")
        return "; ".join(parts)

    @property
    def clock(self) -> str:
        """HH:MM:SS of ``time`` for display."""
        return self.time[11:19]

    @property
    def title(self) -> str:
        return ROLE_TITLES.get(self.role, self.role)


def turns_to_json(turns: list[Turn]) -> str:
    return json.dumps([asdict(t) for t in turns])  # ASCII: safe in an XML attribute


def turns_from_json(text: str | None) -> list[Turn]:
    if not text:
        return []
    return [Turn(**item) for item in json.loads(text)]


def qa_pairs(turns: list[Turn]) -> list[tuple[str, str]]:
    """(question, answer) pairs of completed exchanges, the ``history`` a pipeline takes."""
    pairs = []
    for question, answer in zip(turns, turns[1:]):
        if question.role == "user" and answer.role == "model" and answer.text:
            pairs.append((question.text, answer.text))
    return pairs


def transcript_markdown(turns: list[Turn], title: str = "") -> str:
    """The conversation as Markdown: what Copy and Save transcript write."""
    parts = [f"# {title}\n"] if title else []
    for turn in turns:
        note = "".join(f" ({text})" for text in (turn.note, turn.framing) if text)
        parts.append(f"**{turn.title}** — {turn.time.replace('T', ' ')}{note}\n\n{turn.text}\n")
    return "\n".join(parts)
