"""The demo's image tower with finding evidence: a trained DCFormer and a trained
``FindingSegmenter`` joined into one encoder (``DCFormerConfig.evidence``).

The joined tower's deepest tokens are wider (the evidence channels), so the retrieval towers'
image projection is fitted again on the frozen tower's pooled tokens, with the sigmoid loss
against the frozen text tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..checkpoints import WEIGHTS_NAME, read_config
from ..errors import Med3DVLMError
from ..models.dcformer import DCFormerConfig
from ..models.findings import FindingSegmenter
from ..models.siglip import SigLIPModel, sigmoid_loss
from ..models.text import TextConfig, encode_text_tokens
from .config import TrainConfig
from .trainer import TrainResult, train

PROJECTION_HEAD = ("mm_vision_proj.", "mm_language_proj.", "t_prime", "bias")


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
    """Fits the projections, t' and b on ``pooled`` (image -> mean of its deepest tokens, as
    ``SigLIPModel.image_features`` gives) paired with reports; both towers stay frozen, so each
    side is computed once and the fit costs seconds."""
    texts = _text_features(siglip, [text for _, text in pairs], tokenizer)
    rows = [(pooled[image], text) for (image, _), text in zip(pairs, texts)]

    def loss_fn(model: SigLIPModel, batch) -> torch.Tensor:
        img = model.embed_image_features(batch[0])
        txt = F.normalize(model.mm_language_proj(batch[1]), dim=-1)
        return sigmoid_loss(img, txt, model.t_prime.exp(), model.bias)

    return train(siglip, rows, config, loss_fn=loss_fn, trainable=lambda name: name.startswith(PROJECTION_HEAD))


@torch.inference_mode()
def _text_features(siglip: SigLIPModel, texts: Sequence[str], tokenizer, batch_size: int = 64) -> list[torch.Tensor]:
    """Pooled text-tower outputs (before the projection) of ``texts``."""
    siglip.language_encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                           max_length=siglip.max_text_length, add_special_tokens=False, padding_side="right",
                           return_tensors="pt")
        out += list(encode_text_tokens(siglip.language_encoder, tokens["input_ids"], tokens["attention_mask"],
                                       siglip.text_config.pooling))
    return out
