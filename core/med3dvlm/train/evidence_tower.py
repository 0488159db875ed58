"""The demo's image tower with finding evidence: a trained DCFormer and a trained
``FindingSegmenter`` joined into one encoder (``DCFormerConfig.evidence``).

The joined tower's deepest tokens are wider (the evidence channels), so the retrieval towers are
fitted again on the frozen tower's pooled tokens with the sigmoid loss: a fresh text tower and
both projections (``refit_retrieval``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoints import WEIGHTS_NAME, read_config
from ..errors import Med3DVLMError
from ..models.dcformer import DCFormerConfig
from ..models.findings import FindingSegmenter
from ..models.siglip import BIAS_INIT, T_PRIME_INIT, SigLIPModel, sigmoid_loss
from ..models.text import TextConfig, build_text_model
from .config import TrainConfig
from .trainer import TrainResult, train
from .volumes import image_text_collate


def with_evidence(siglip: SigLIPModel, segmenter: FindingSegmenter) -> SigLIPModel:
    """A copy of ``siglip`` whose image tower carries ``segmenter``; its image projection is new."""
    joined = SigLIPModel(dataclasses.replace(siglip.vision_config, evidence=True), siglip.text_config,
                         siglip.embed_dim)
    state = {k: v for k, v in siglip.state_dict().items() if not k.startswith("mm_vision_proj.")}
    missing, unexpected = joined.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("mm_vision_proj.", "vision_encoder.evidence.")) for k in missing)
    joined.vision_encoder.evidence.load_state_dict(segmenter.state_dict())
    joined.max_text_length = siglip.max_text_length
    return joined.eval()


def towers_without_evidence(folder: str | Path) -> SigLIPModel:
    """The DCFormer and text tower of a demo bundle's ``siglip/`` folder, without the finding evidence
    and the image projection that ``with_evidence`` replaces: a bundle built with other evidence
    channels still resumes."""
    config = read_config(folder)
    try:
        siglip = SigLIPModel(DCFormerConfig(**{**config["vision"], "evidence": False}), TextConfig(**config["text"]),
                             int(config["embed_dim"]))
        state = {k: v for k, v in load_file(str(Path(folder) / WEIGHTS_NAME)).items()
                 if not k.startswith(("vision_encoder.evidence.", "mm_vision_proj."))}
        missing, unexpected = siglip.load_state_dict(state, strict=False)
        wrong = unexpected + [k for k in missing if not k.startswith("mm_vision_proj.")]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        wrong = [str(error)]
    if wrong:
        raise Med3DVLMError(f"{folder} does not hold the retrieval towers of a demo model ({wrong[0]}); resume "
                            f"from a folder written by med3dvlm train demo.")
    siglip.max_text_length = int(config["max_text_length"])
    return siglip


def refit_retrieval(siglip: SigLIPModel, pooled: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
                    tokenizer, config: TrainConfig) -> TrainResult:
    """Trains a fresh text tower with both projections, t' and b against ``pooled`` (image -> mean of
    its deepest tokens, as ``SigLIPModel.image_features`` gives) from the frozen image tower.

    Why a fresh text tower: the whole-volume SigLIP stage leaves one whose pooled outputs no longer
    tell reports apart (on 150 unseen phantoms, image-to-report R@1 0.04 even against image features
    made of the truth, with the tower frozen or fine-tuned; 0.59 with a fresh one and 0.61 with a bag
    of words, December 2026). Why standardised features: the DCFormer's channels and the evidence
    probabilities differ in scale by orders; R@1 on the real tower's features 0.18 raw, 0.36
    standardised. The standardisation is folded into ``mm_vision_proj`` afterwards, so the saved
    towers embed images as before."""
    torch.manual_seed(config.seed)
    siglip.language_encoder = build_text_model(siglip.text_config)
    siglip.mm_language_proj.reset_parameters()
    siglip.mm_vision_proj.reset_parameters()
    with torch.no_grad():
        siglip.t_prime.fill_(T_PRIME_INIT)
        siglip.bias.fill_(BIAS_INIT)
    images = sorted({image for image, _ in pairs})  # an image paired with several wordings counts once
    stacked = torch.stack([pooled[image] for image in images])
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    standard = dict(zip(images, (stacked - mean) / std))
    rows = [(standard[image], text, None) for image, text in pairs]

    def loss_fn(model: SigLIPModel, batch: dict) -> torch.Tensor:
        return sigmoid_loss(model.embed_image_features(batch["images"]),
                            model.encode_text(batch["input_ids"], batch["attention_mask"]),
                            model.t_prime.exp(), model.bias)

    result = train(siglip, rows, config, loss_fn=loss_fn, collate_fn=image_text_collate(tokenizer, siglip.max_text_length),
                   trainable=lambda name: not name.startswith("vision_encoder."))
    with torch.no_grad():  # W((x - mean) / std) + b = (W / std) x + (b - W (mean / std))
        projection = siglip.mm_vision_proj
        projection.bias -= projection.weight @ (mean / std).to(projection.weight)
        projection.weight /= std.to(projection.weight)
    siglip.eval()
    return result
