"""Phantom truths without volumes, and the texts a phantom of that truth would come with.

The language stage on oracle tokens needs no pixels: its image tokens are made from the truth
(``train.oracle``). So besides the phantoms the build renders, it can learn from any number of
truths drawn like the generator draws them (``sample_cases``), each with its reports and its
questions written by the same writers as the rendered phantoms' (``truth_examples``). With a fresh
truth behind most examples, the only way to a lower loss is to read the tokens, not to remember
the phantoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import prompts
from ..data.lesions import ABNORMALITIES, ALLOWED, FLUID_LOCATION, LOCATIONS, N_FINDINGS_P, ORGANS, SIZE_MM, Finding
from ..data.phantoms import CT_PHASES, FindingFacts
from ..data.questions import closed_questions, open_questions
from ..data.reports import write_report
from .examples import REPORT_INSTRUCTIONS, Example


@dataclass(frozen=True)
class CaseTruth(FindingFacts):
    """A ground truth rebuilt from a case of labels.json (or of ``sample_cases``), for the writers."""

    modality: str
    phase: str | None
    findings: list[Finding]

    @classmethod
    def from_case(cls, case: dict) -> CaseTruth:
        return cls(case["modality"], case["phase"],
                   [Finding(**{**f, "center_mm": tuple(f["center_mm"])}) for f in case["findings"]])


def sample_case(rng: np.random.Generator) -> dict:
    """A CT truth drawn as ``data.lesions.place_findings`` draws one (0-2 findings, kinds balanced,
    distinct organ x kind pairs, sizes and locations from the same tables), in labels.json form."""
    n = int(rng.choice(len(N_FINDINGS_P), p=N_FINDINGS_P))
    findings: list[dict] = []
    while len(findings) < n:
        kind = str(rng.choice(ABNORMALITIES))
        organ = str(rng.choice([o for o in ORGANS if kind in ALLOWED[o]]))
        if any(f["organ"] == organ and f["kind"] == kind for f in findings):
            continue
        low, high = SIZE_MM[kind]
        location = FLUID_LOCATION[organ] if kind == "fluid" else str(rng.choice(LOCATIONS[organ]))
        findings.append({"organ": organ, "kind": kind, "size_mm": int(rng.integers(low, high + 1)),
                         "location": location, "center_mm": [0.0, 0.0, 0.0]})
    return {"modality": "CT", "phase": str(rng.choice(CT_PHASES)), "findings": findings}


def sample_cases(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [sample_case(rng) for _ in range(n)]


# Open questions answered by listing what is present: one query ("what holds?") reads them, the
# same whatever the question, which a language model from scratch learns first (train.demo).
READING_QUESTIONS = ("What abnormalities are present?", "Summarize the abnormal findings.",
                     "How many abnormalities are there?")


def is_reading(example: Example) -> bool:
    """Whether an example asks one of ``READING_QUESTIONS``."""
    return example.prompt.endswith(READING_QUESTIONS)


def is_report(example: Example) -> bool:
    """Whether an example's answer is a report (the writers' reports open with "Findings:")."""
    return example.answer.startswith("Findings:")


def truth_examples(key: str, case: dict, n_tokens: int, rng: np.random.Generator, *,
                   reports: int = 1) -> list[Example]:
    """``reports`` reports and every closed and open question of the phantom writers for one
    truth, as training examples of the image ``key``."""
    truth = CaseTruth.from_case(case)
    out = [Example(key, prompts.report_prompt(n_tokens, REPORT_INSTRUCTIONS[int(rng.integers(len(REPORT_INSTRUCTIONS)))]),
                   write_report(truth, rng)) for _ in range(reports)]
    out += [Example(key, prompts.vqa_prompt(n_tokens, q["question"], (), q["choices"]),
                    prompts.choice_answer(q["answer_choice"], q["choices"])) for q in closed_questions(truth, rng)]
    out += [Example(key, prompts.vqa_prompt(n_tokens, q["question"]), q["answer"]) for q in open_questions(truth, rng)]
    return out
