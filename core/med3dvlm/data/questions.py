"""Closed (A-D) and open questions about a phantom, answered from its ground truth.

Question types follow M3D-VQA's numbering (its CSV column "Question Type"):
1 plane, 2 phase (for MRI: the sequence), 3 organ, 4 abnormality, 5 location.
Every closed question has four distinct choices and exactly one correct one; its answer text
is also a valid short open answer, as in M3D-VQA.
"""

from __future__ import annotations

import numpy as np

from ..volume import MR_SEQUENCES
from .lesions import ALLOWED, LOCATIONS, ORGANS
from .reports import PHASE_TEXT, _pick, impression_item, in_reading_order

QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
LETTERS = ("A", "B", "C", "D")
KIND_NAME = {"cyst": "Cyst", "mass": "Mass", "calcification": "Calcification",
             "haemorrhage": "Haemorrhage", "fluid": "Fluid collection"}
SEQUENCE_NAME = {"T1": "T1-weighted", "T2": "T2-weighted", "FLAIR": "FLAIR",
                 "DWI": "Diffusion-weighted (DWI)", "ADC": "ADC map",
                 "T1C": "Contrast-enhanced T1-weighted"}
PHASE_CHOICES = ("Non-contrast", "Portal venous phase", "Arterial phase", "Delayed phase")
FLUID_REGION = {"liver": "Perihepatic space", "left lung": "Left pleural space",
                "right lung": "Right pleural space"}
_LOCATION_CHOICES = {"liver": LOCATIONS["liver"],
                     "left lung": ("lower lobe", "lingula", "upper lobe", "apex"),
                     "right lung": ("lower lobe", "middle lobe", "upper lobe", "apex")}
_COUNT_WORDS = ("None", "One", "Two", "Three", "Four")
SIZE_BINS = ((10, "Less than 10 mm"), (20, "10 to 20 mm"), (40, "20 to 40 mm"),
             (10**6, "More than 40 mm"))
YES_NO_CHOICES = ("Yes", "No", "Indeterminate", "Not assessable")


def _closed(rng, qtype: int, question: str, answer: str, others) -> dict:
    """Shuffle the answer among three distinct distractors."""
    distractors = [o for o in dict.fromkeys(others) if o != answer][:3]
    if len(distractors) != 3:
        raise ValueError(f"need three distractors for {question!r}, got {distractors}")
    choices = [answer, *distractors]
    choices = [choices[i] for i in rng.permutation(4)]
    return {"type": qtype, "question": question, "choices": choices,
            "answer_choice": LETTERS[choices.index(answer)], "answer": answer}


def _kind_name(kind: str, organ: str) -> str:
    return "Pleural effusion" if kind == "fluid" and organ.endswith("lung") else KIND_NAME[kind]


def _subject(f) -> str:
    """How a question names one finding: 'the cyst in the spleen', 'the right pleural effusion'."""
    if f.kind != "fluid":
        return f"the {f.kind} in the {f.organ}"
    if f.organ == "liver":
        return "the perihepatic fluid"
    return f"the {f.organ.split()[0]} pleural effusion"


def _presence(organ: str, kind: str) -> str:
    if kind == "fluid":
        return ("Is there perihepatic fluid?" if organ == "liver"
                else f"Is there a {organ.split()[0]} pleural effusion?")
    article = "" if kind == "haemorrhage" else "a "
    return f"Is there {article}{kind} in the {organ}?"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _size_bin(size_mm: int) -> str:
    return next(label for limit, label in SIZE_BINS if size_mm < limit)


def _location_choices(organ: str) -> tuple[str, ...]:
    return _LOCATION_CHOICES.get(organ, LOCATIONS[organ] + ("hilum",))


def _negative_pair(truth, rng) -> tuple[str, str]:
    pairs = [(o, k) for o in ORGANS for k in ALLOWED[o] if (o, k) not in truth.pairs]
    return pairs[int(rng.integers(len(pairs)))]


def _acquisition(truth, rng, sequence: str | None, closed: bool) -> dict | None:
    if truth.modality == "CT":
        answer = _cap(PHASE_TEXT[truth.phase])
        question = _pick(rng, ["What is the contrast phase of this CT scan?",
                               "In which phase was this CT image acquired?"])
        others = PHASE_CHOICES
    elif sequence is not None:
        answer = SEQUENCE_NAME[sequence]
        question = _pick(rng, ["Which MRI sequence is shown?", "What type of MR image is this?"])
        others = [SEQUENCE_NAME[s] for s in rng.permutation(MR_SEQUENCES).tolist()]
    else:
        return None
    if closed:
        return _closed(rng, 2, question, answer, others)
    return {"type": 2, "question": question, "answer": answer}


def closed_questions(truth, rng: np.random.Generator, *, sequence: str | None = None) -> list[dict]:
    """Multiple-choice questions: dicts with type, question, choices (4), answer_choice, answer.

    ``sequence`` (MRI) adds a question about which sequence the image is.
    """
    qs = []
    acq = _acquisition(truth, rng, sequence, closed=True)
    if acq:
        qs.append(acq)
    n = len(truth.findings)
    window = _COUNT_WORDS[:4] if n <= 3 else _COUNT_WORDS[1:]
    qs.append(_closed(rng, 4, _pick(rng, ["How many abnormalities are seen in this scan?",
                                          "How many abnormal findings are present?"]),
                      _COUNT_WORDS[n], window))
    by_organ, kinds = truth.organ_labels, [f.kind for f in truth.findings]
    for f in truth.findings:
        if kinds.count(f.kind) == 1:            # only then is "which organ" unambiguous
            if f.kind == "fluid":
                others = [*FLUID_REGION.values(), "Pelvis"]
                qs.append(_closed(rng, 3, "Where is the fluid collection located?",
                                  FLUID_REGION[f.organ], others))
            else:
                others = [o.capitalize() for o in rng.permutation(ORGANS).tolist()]
                qs.append(_closed(rng, 3, f"Which organ contains the {f.kind}?",
                                  f.organ.capitalize(), others))
        if len(by_organ[f.organ]) == 1:         # only then is "which abnormality" unambiguous
            others = [_kind_name(k, f.organ) for k in rng.permutation(list(KIND_NAME)).tolist()]
            qs.append(_closed(rng, 4, f"What abnormality is seen in the {f.organ}?",
                              _kind_name(f.kind, f.organ), others))
        qs.append(_closed(rng, 4, f"What is the size of {_subject(f)}?", _size_bin(f.size_mm),
                          [label for _, label in SIZE_BINS]))
        if f.kind != "fluid":
            choices = [c.capitalize() for c in _location_choices(f.organ)]
            qs.append(_closed(rng, 5, f"Where in the {f.organ} is the {f.kind} located?",
                              f.location.capitalize(), choices))
    effusion = [s for s in ("left", "right") if "fluid" in by_organ[f"{s} lung"]]
    if effusion:
        answer = "Bilateral" if len(effusion) == 2 else effusion[0].capitalize()
        qs.append(_closed(rng, 5, "On which side is the pleural effusion?", answer,
                          ["Left", "Right", "Bilateral", "None"]))
    for kind in {f.kind for f in truth.findings if f.organ.endswith("kidney")}:
        sides = [s for s in ("left", "right") if kind in by_organ[f"{s} kidney"]]
        answer = "Both kidneys" if len(sides) == 2 else f"{sides[0].capitalize()} kidney"
        qs.append(_closed(rng, 5, f"Which kidney contains the {kind}?", answer,
                          ["Left kidney", "Right kidney", "Both kidneys", "Neither kidney"]))
    organ, kind = _yes_no_pair(truth, rng)
    answer = "Yes" if (organ, kind) in truth.pairs else "No"
    qs.append(_closed(rng, 4, _presence(organ, kind), answer, YES_NO_CHOICES))
    return qs


def _yes_no_pair(truth, rng) -> tuple[str, str]:
    """A present pair half of the time (when there is one), else an absent one."""
    if truth.findings and rng.random() < 0.5:
        f = truth.findings[int(rng.integers(len(truth.findings)))]
        return f.organ, f.kind
    return _negative_pair(truth, rng)


def open_questions(truth, rng: np.random.Generator, *, sequence: str | None = None) -> list[dict]:
    """Free-text questions with short answers: dicts with type, question, answer."""
    qs = []
    acq = _acquisition(truth, rng, sequence, closed=False)
    if acq:
        qs.append(acq)
    items = [_cap(impression_item(f, rng)) for f in in_reading_order(truth.findings)]
    qs.append({"type": 4, "question": _pick(rng, ["What abnormalities are present?",
                                                  "Summarize the abnormal findings."]),
               "answer": "; ".join(items) if items else "No abnormality"})
    qs.append({"type": 4, "question": "How many abnormalities are there?",
               "answer": str(len(truth.findings))})
    for f in truth.findings:
        qs.append({"type": 4, "question": f"How large is {_subject(f)}?",
                   "answer": f"{f.size_mm} mm"})
        if f.kind != "fluid":
            qs.append({"type": 5, "question": f"Where in the {f.organ} is the {f.kind}?",
                       "answer": _cap(f.location)})
        if len(truth.organ_labels[f.organ]) == 1:
            qs.append({"type": 4, "question": f"What abnormality is seen in the {f.organ}?",
                       "answer": _kind_name(f.kind, f.organ)})
    organ, kind = _yes_no_pair(truth, rng)
    qs.append({"type": 4, "question": _presence(organ, kind),
               "answer": "Yes" if (organ, kind) in truth.pairs else "No"})
    organ = _pick(rng, ORGANS)
    qs.append({"type": 3, "question": f"Is the {organ} normal?",
               "answer": "No" if truth.organ_labels[organ] else "Yes"})
    return qs
