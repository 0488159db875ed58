"""The language-stage gate: a language model trained on oracle image tokens must say what they carry.

Before a language model is trained on a tower's tokens, the language stage itself is proven: its
image tokens are made from the phantom's truth (which organ x kind pairs are present, the CT
phase, the modality), embedded into as many tokens of the LM's width as the projector gives,
plus noise. If a model trained on these cannot write the findings into its reports and answer
closed questions on phantoms it never saw, no tower can help it, and the recipe of the language
stage is what needs fixing.

Token f carries fact f as a key and a value, like a word in a memory: a fixed identity direction
(the same whether or not the fact holds, so attention can find the token from a question about
it) plus a value direction signed + when the fact holds and - when it does not (seeded random
unit vectors, scaled to ``SCALE``); tokens after the last fact carry nothing; every element gets
Gaussian noise of ``noise``. Measured on 2 CPU cores with the demo's LM from scratch: a code
spread over all tokens (each fact a direction in every token) was not read after three epochs
(report recall 0.0, closed VQA 0.54), nor was one signed direction per token after 300 steps of
closed questions (the sign flips the attention key: a question cannot find an absent fact).
The projector is later taught to give this layout from the tower's tokens (``align_projector``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.lesions import PAIRS
from ..data.phantoms import CT_PHASES
from ..errors import Med3DVLMError
from ..eval.phantom_eval import evaluate_phantoms
from ..pipeline import Pipeline

FACTS = tuple(f"{o}/{k}" for o, k in PAIRS) + tuple(f"phase:{p}" for p in CT_PHASES) + ("modality:CT", "modality:MR")


def case_facts(case: dict) -> torch.Tensor:
    """Multi-hot over ``FACTS`` of one case of a phantom dataset's labels.json."""
    facts = {f"{f['organ']}/{f['kind']}" for f in case["findings"]}
    facts |= {f"phase:{case['phase']}", f"modality:{case['modality']}"}
    return torch.tensor([float(name in facts) for name in FACTS])


SCALE = 3.0


def oracle_tokens(facts: torch.Tensor, n_tokens: int, width: int, noise: float = 0.1, seed: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(F,) facts -> (n_tokens, width) tokens: token f is fact f's identity +/- its value (see above)."""
    if n_tokens < len(FACTS):
        raise ValueError(f"Oracle tokens need at least {len(FACTS)} image tokens, one per fact; got {n_tokens}.")
    identity, value = torch.randn(2, len(FACTS), width, generator=torch.Generator().manual_seed(seed))
    identity, value = (SCALE / 2**0.5 * v / v.norm(dim=-1, keepdim=True) for v in (identity, value))
    tokens = torch.zeros(n_tokens, width)
    tokens[:len(FACTS)] = identity + (2 * facts.float() - 1)[:, None] * value
    return tokens + noise * torch.randn(tokens.shape, generator=generator)


def oracle_features(roots, n_tokens: int, width: int, noise: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Image path -> oracle tokens, for every image of these phantom datasets (one noise draw each)."""
    generator = torch.Generator().manual_seed(seed + 1)
    out = {}
    for root in roots:
        for case in json.loads((Path(root) / "labels.json").read_text())["cases"]:
            facts = case_facts(case)
            for image in case["images"]:
                out[str(Path(root) / image)] = oracle_tokens(facts, n_tokens, width, noise, seed, generator)
    return out


class OraclePipeline(Pipeline):
    """A ``Pipeline`` whose image tokens come from the truth, so ``evaluate_phantoms`` judges the
    language stage alone, exactly as it judges a whole model."""

    def __init__(self, model, tokenizer, tokens: dict[str, torch.Tensor]) -> None:
        super().__init__(model, tokenizer, name="oracle tokens")
        self.tokens = tokens

    def encode(self, volume, region=None, window=None) -> torch.Tensor:
        if region is not None or window is not None:
            raise ValueError("Oracle tokens describe whole phantoms: no region or window.")
        return self.tokens[str(volume)][None].to(self.device, self.dtype)


class LanguageGateFailed(Med3DVLMError):
    """A language model trained on oracle tokens does not say what they carry."""


@dataclass
class LanguageGate:
    """What the language stage must reach on unseen phantoms from oracle tokens."""

    recall: float = 0.95
    invented: float = 0.05          # share of reports that state a finding the phantom lacks
    closed_vqa: float = 0.95
    noise: float = 0.1
    n_phantoms: int = 150


def language_gate(model, tokenizer, features: dict[str, torch.Tensor], gate_root: Path, gate: LanguageGate,
                  progress: bool = False) -> dict:
    """Scores a model trained on oracle ``features`` on the gate phantoms; raises below the gate."""
    model.eval()
    scores = evaluate_phantoms(OraclePipeline(model, tokenizer, features), gate_root, n=gate.n_phantoms,
                               progress=progress)
    figures = {k: scores[k] for k in ("report_recall", "reports_with_invented_finding", "closed_vqa_accuracy")}
    passed = (figures["report_recall"] >= gate.recall and figures["reports_with_invented_finding"] <= gate.invented
              and figures["closed_vqa_accuracy"] >= gate.closed_vqa)
    if not passed:
        raise LanguageGateFailed(
            f"LANGUAGE GATE FAILED: trained on oracle image tokens, the language stage reaches report recall "
            f"{figures['report_recall']:.3f} (gate {gate.recall:.2f}), invented findings in "
            f"{figures['reports_with_invented_finding']:.3f} of reports (gate {gate.invented:.2f}) and closed VQA "
            f"{figures['closed_vqa_accuracy']:.3f} (gate {gate.closed_vqa:.2f}) on {scores['n_volumes']} unseen "
            f"phantoms; fix the language stage's recipe before training it on a tower's tokens.")
    return {**figures, "n_volumes": scores["n_volumes"], "example_report": scores["example_report"]}
