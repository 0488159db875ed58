"""Prompt text for report generation and VQA, in the format the Med3DVLM weights were trained on.

The official format (see shared reference): ``"<im_patch>" * N + question`` for reports (no space),
``"<im_patch>" * N + " " + question`` for VQA, closed questions append
``" Choices: A. a B. b C. c D. d"`` and were answered as ``"{letter}. {text}"``. No chat template.
Multi-turn chat is our extension: earlier turns are appended as ``" question answer"`` pairs
before the new question, so a model trained that way (the demo model) sees the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<im_patch>"
REPORT_PROMPT = "Describe the findings of the medical image you see."
LETTERS = ("A", "B", "C", "D")


def image_placeholder(num_image_tokens: int) -> str:
    return IMAGE_TOKEN * num_image_tokens


def format_choices(choices: Sequence[str]) -> str:
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"closed questions take 2 to {len(LETTERS)} choices, got {len(choices)}")
    return " Choices: " + " ".join(f"{letter}. {text}" for letter, text in zip(LETTERS, choices))


def report_prompt(num_image_tokens: int, instruction: str = REPORT_PROMPT) -> str:
    return image_placeholder(num_image_tokens) + instruction


def vqa_prompt(
    num_image_tokens: int,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    choices: Sequence[str] | None = None,
) -> str:
    turns = "".join(f" {q} {a}" for q, a in history)
    closed = format_choices(choices) if choices else ""
    return image_placeholder(num_image_tokens) + turns + " " + question + closed


def choice_answer(letter: str, choices: Sequence[str]) -> str:
    """The answer text closed-VQA training used: ``"B. spleen"``."""
    return f"{letter}. {choices[LETTERS.index(letter)]}"
