"""The Med3DVLM training stages, as functions over in-memory data.

1. ``siglip_stage``: DCFormer image tower + text tower, pairwise sigmoid loss on volume/report pairs.
2. ``vlm_stage`` with ``train_lm=False``: projector alignment on captions, encoder and LM frozen.
3. ``vlm_stage`` with ``train_lm=True``: instruction tuning on reports and VQA; the LM is trained
   fully, or through LoRA adapters (peft) that are merged back afterwards.
In the VLM stages the encoder is frozen, so its features are computed once (``encoder_features``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers import Qwen2Config

from ..models.dcformer import DCFormerConfig
from ..models.projector import ProjectorConfig
from ..models.siglip import SigLIPModel
from ..models.text import TextConfig
from ..models.vlm import Med3DVLM, Med3DVLMConfig
from ..tokenizer import image_token_id
from .config import TrainConfig
from .dense import OrganAwareSigLIP
from .examples import Example, collate_examples
from .trainer import TrainResult, train
from .volumes import ImageTextDataset, LengthBatchedExamples, image_text_collate

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def siglip_stage(pixels: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]], tokenizer,
                 vision: DCFormerConfig, text: TextConfig, embed_dim: int, config: TrainConfig,
                 max_text_length: int = 256, targets: dict[str, dict[str, torch.Tensor]] | None = None,
                 ) -> tuple[SigLIPModel, TrainResult]:
    """SigLIP pre-training; with ``targets`` (image -> ``dense.phantom_targets``) the organ-aware
    decoder and token heads of ``dense.OrganAwareSigLIP`` train the image tower too."""
    model = SigLIPModel(vision, text, embed_dim=embed_dim)
    model.max_text_length = max_text_length
    trained = OrganAwareSigLIP(model) if targets else model
    # BERT's pooler is unused by our pooling: keep it out of training (and out of DDP's reducer).
    result = train(trained, ImageTextDataset(pixels, pairs, targets), config,
                   collate_fn=image_text_collate(tokenizer, max_text_length),
                   trainable=lambda name: ".pooler." not in name)
    return model.eval(), result


def build_vlm(tokenizer, vision: DCFormerConfig, lm: Qwen2Config, preprocess_preset: str,
              prompt_style: str = "med3dvlm", **projector_sizes) -> Med3DVLM:
    """A fresh VLM whose vocabulary is the tokenizer's (``<im_patch>`` included)."""
    lm.vocab_size = max(lm.vocab_size, len(tokenizer))
    projector = ProjectorConfig.for_encoder(vision, lm.hidden_size, **projector_sizes)
    config = Med3DVLMConfig(text_config=lm, vision_config=vision, projector_config=projector,
                            image_token_id=image_token_id(tokenizer), preprocess_preset=preprocess_preset,
                            prompt_style=prompt_style)
    return Med3DVLM(config)


def vlm_stage(model: Med3DVLM, features: dict, examples: Sequence[Example], tokenizer, config: TrainConfig,
              *, train_lm: bool, lora_rank: int | None = None, max_length: int = 512,
              image_token_centering: float = 0.0) -> TrainResult:
    """Trains the projector (and the LM when ``train_lm``) on cached encoder features: per image
    (low, high) stage tokens, or LM-width image tokens that bypass the projector (``train.oracle``).

    ``image_token_centering`` weighs a penalty on the batch mean of the image tokens. An LM
    trained from scratch otherwise turns the image tokens into a large constant prefix (a soft
    prompt) on which the image shows only as a ~2 % ripple, and learns to ignore it; keeping
    the tokens centred across images leaves only what differs between images. Off by default:
    the official recipe, which starts from a pre-trained LM, has no such term.
    """
    if lora_rank:
        _add_lora(model, lora_rank)

    through_projector = not isinstance(next(iter(features.values())), torch.Tensor)

    def trainable(name: str) -> bool:
        if name.startswith("mm_projector."):
            return through_projector
        return train_lm and name.startswith("language_model.") and (not lora_rank or "lora_" in name)

    def loss_fn(m: Med3DVLM, batch: dict) -> torch.Tensor:
        image_tokens = batch.pop("image_tokens") if "image_tokens" in batch else \
            m.mm_projector(batch.pop("low"), batch.pop("high"))
        loss = m(image_tokens=image_tokens, **batch).loss
        if image_token_centering and len(image_tokens) > 1:
            loss = loss + image_token_centering * image_tokens.mean(0).square().mean()
        return loss

    def collate(rows):
        feats, examples_ = zip(*rows[0])  # one pre-formed batch per item
        batch = collate_examples(examples_, tokenizer, max_length)
        if isinstance(feats[0], torch.Tensor):
            batch["image_tokens"] = torch.stack(feats).float()
        else:
            batch["low"] = torch.stack([f[0] for f in feats]).float()
            batch["high"] = torch.stack([f[1] for f in feats]).float()
        return batch

    model.vision_tower.eval()  # frozen: BatchNorm keeps its statistics
    batches = LengthBatchedExamples(features, examples, config.batch_size, config.seed)
    result = train(model, batches, dataclasses.replace(config, batch_size=1), loss_fn=loss_fn,
                   collate_fn=collate, trainable=trainable)
    if lora_rank:
        model.language_model = model.language_model.merge_and_unload()
    return result


def align_projector(model: Med3DVLM, features: dict, targets: dict[str, torch.Tensor],
                    config: TrainConfig) -> TrainResult:
    """Teaches the projector to give ``targets`` (image -> LM-width tokens, e.g. noise-free oracle
    tokens) from the encoder's cached (low, high) tokens, by mean squared error; the LM is untouched.

    A language model proven on oracle tokens then receives the layout it reads from the first
    step of the joint stage, instead of waiting for the projector and itself to meet.
    """
    rows = [(low.float(), high.float(), targets[key]) for key, (low, high) in features.items()]

    def loss_fn(m: Med3DVLM, batch) -> torch.Tensor:
        low, high, target = batch
        return torch.nn.functional.mse_loss(m.mm_projector(low, high), target)

    return train(model, rows, config, loss_fn=loss_fn, trainable=lambda name: name.startswith("mm_projector."))


def cross_fitted_tokens(model: Med3DVLM, features: dict, targets: dict[str, torch.Tensor], config: TrainConfig,
                        folds: int) -> dict[str, torch.Tensor]:
    """Each volume's image tokens from a projector aligned (``align_projector``) on the other ``folds`` - 1
    folds: what the projector gives a volume it never saw. A language model trained on these learns the
    projector's errors on unseen volumes; on its own training volumes the projector is near exact.
    The projector is left as it was (its weights before the first fold)."""
    start = {k: v.clone() for k, v in model.mm_projector.state_dict().items()}
    keys = sorted(features)
    device = next(model.mm_projector.parameters()).device
    tokens: dict[str, torch.Tensor] = {}
    for fold in range(folds):
        held = keys[fold::folds]
        seen = set(held)
        model.mm_projector.load_state_dict(start)
        align_projector(model, {k: features[k] for k in keys if k not in seen}, targets,
                        dataclasses.replace(config, output_dir=f"{config.output_dir}/fold-{fold}"))
        model.mm_projector.eval()
        with torch.inference_mode():
            low, high = (torch.stack([features[k][n] for k in held]).float().to(device) for n in (0, 1))
            tokens.update(zip(held, model.mm_projector(low, high).cpu()))
    model.mm_projector.load_state_dict(start)
    return tokens


def _add_lora(model: Med3DVLM, rank: int) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(LORA_TARGETS))
    model.language_model = get_peft_model(model.language_model, lora)
