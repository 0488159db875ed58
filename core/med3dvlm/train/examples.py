"""Training examples for the VLM stages, in the official Med3DVLM text format.

Captions become ``<im_patch>*N + caption prompt`` -> report; VQA rows become
``<im_patch>*N + " " + question [+ " Choices: ..."]`` -> answer (``"B. spleen"`` for closed
questions). The answer follows the prompt after one space and ends with the EOS token, as in
the official datasets; the loss covers the answer only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import prompts

# Caption instructions in the style of the official caption templates (our own wording).
REPORT_INSTRUCTIONS = (
    prompts.REPORT_PROMPT,
    "Write a radiology report for this scan.",
    "What are the findings in this volume?",
    "Please describe this CT or MRI study.",
    "Summarise the findings of this scan.",
)


@dataclass(frozen=True)
class Example:
    image: str          # key of the volume (its path)
    prompt: str         # text including the image placeholders
    answer: str


def caption_examples(items, num_image_tokens: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(str(item.image_path), prompts.report_prompt(num_image_tokens, rng.choice(REPORT_INSTRUCTIONS)),
                    item.text) for item in items]


def vqa_examples(items, num_image_tokens: int) -> list[Example]:
    out = []
    for item in items:
        choices = [c for c in item.choices if c] if item.closed else None
        answer = prompts.choice_answer(item.answer_choice, choices) if choices else item.answer
        out.append(Example(str(item.image_path), prompts.vqa_prompt(num_image_tokens, item.question, (), choices),
                           answer))
    return out


def collate_examples(examples: Sequence[Example], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the answer (and EOS) only."""
    rows, labels = [], []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt)["input_ids"]  # with BOS where the tokenizer adds one, as at inference
        answer_ids = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        rows.append(ids)
        labels.append(([-100] * len(prompt_ids) + answer_ids)[:max_length])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        label_ids[r, :len(lab)] = torch.tensor(lab)
        mask[r, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}
