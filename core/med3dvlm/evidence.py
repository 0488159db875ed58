"""Evidence maps: where in the scan an answer came from.

An answer is a differentiable score of the model's input: for a report or a question, the
log-likelihood of the answer's tokens given the image, teacher forced as the model was trained
(the prompt, then " " + answer + EOS); for a MedMAP abnormality, the detector's logit. Its
attribution on the input (``attribution.py``) is carried back through the exact preprocessing of
the volume (``geometry.py``) onto the volume's own voxel grid: a float32 map with the volume's
affine, 0 wherever the model saw nothing (outside the crop box or the region). Positive values
support the answer, negative ones speak against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .attribution import Progress, attribute, frozen
from .cancel import CancelToken
from .explained import Evidence
from .geometry import to_volume_grid
from .model_input import prepare_input
from .models.vlm import IGNORE_INDEX
from .preprocess import PreprocessConfig
from .region import Region
from .volume import Volume


def evidence_maps(score: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                  volumes: Sequence[Volume], records: Sequence[dict], method: str = "smoothgrad",
                  samples: int = 8, save_memory: bool = False, cancel: CancelToken | None = None,
                  progress: Progress | None = None) -> list[Volume]:
    """Attribution of ``score`` to ``pixels`` (the (1, D, H, W) inputs made from ``volumes``,
    stacked), each carried back onto its volume's grid (see ``attribution.attribute``)."""
    attribution = attribute(score, pixels, method, samples, save_memory=save_memory, cancel=cancel,
                            progress=progress).cpu()
    return [Volume(to_volume_grid(a[0], v, r), v.affine.copy(), modality=v.modality, sequence=v.sequence,
                   source=f"evidence map on {v.name}") for a, v, r in zip(attribution, volumes, records)]


def explain_answer(model, tokenizer, volume: Volume, config: PreprocessConfig, prompt: str, answer: str,
                   question: str | None, *, region: Region | None = None, window: Sequence[float] | None = None,
                   device: torch.device | None = None, method: str = "smoothgrad", samples: int = 8,
                   save_memory: bool = False, cancel: CancelToken | None = None,
                   progress: Progress | None = None) -> Evidence:
    """Evidence for ``answer`` to ``prompt`` from a Med3DVLM-style ``model`` (its forward takes
    ``pixels`` and ``labels``), for the volume cropped to ``region`` and shown in ``window``."""
    pixels, record = prepare_input(volume, config, region, window, device)
    prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS where the tokenizer adds one, as in training
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids], device=pixels.device)
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = IGNORE_INDEX

    def log_likelihood(image: torch.Tensor) -> torch.Tensor:
        return -model(input_ids=ids, labels=labels, pixels=image).loss * len(answer_ids)

    with frozen(model):
        (evidence,) = evidence_maps(log_likelihood, pixels[None], [volume], [record], method, samples, save_memory,
                                    cancel, progress)
    return Evidence(evidence, answer, question, method, record)
