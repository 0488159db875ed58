"""Conversation turns, the unit shown in the chat panel and stored in text nodes (no Qt, no MRML)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

ROLE_TITLES = {"user": "You", "model": "Med3DVLM", "error": "Error"}


def now() -> str:
    """Local time, ISO 8601 to the millisecond: sortable, and readable in the saved scene."""
    return datetime.now().isoformat(timespec="milliseconds")


@dataclass
class Turn:
    role: str  # "user", "model" or "error"
    text: str
    time: str
    note: str = ""  # "stopped" when the user stopped the answer

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
        note = f" ({turn.note})" if turn.note else ""
        parts.append(f"**{turn.title}** — {turn.time.replace('T', ' ')}{note}\n\n{turn.text}\n")
    return "\n".join(parts)
