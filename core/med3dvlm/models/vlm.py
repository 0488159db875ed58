"""Med3DVLM: DCFormer image encoder -> dual-stream mixer projector -> Qwen2 language model.

Reads top to bottom: the config, the image-token insertion (the one place where the released
weights fix an unusual convention), then the model with encode / forward / generate and its
safetensors save and load.

Prompts hold a run of ``num_image_tokens`` ``<im_patch>`` placeholders (see ``prompts.py``). The
official code replaces sequence positions 1..N with the image tokens, whatever the tokenizer; with
Qwen's tokenizer (no BOS) the prompt starts with the placeholders, so the first ``<im_patch>``
embedding stays at position 0, the image fills 1..N and the question's first token is dropped.
Prompt style ``"med3dvlm"`` reproduces that (the released weights were trained so); style
``"exact"`` writes the image over the placeholders themselves (what M3D-LaMed's BOS tokenizers
get from the same official code). Both locate the placeholder run per row, so left padding works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from med3dvlm.checkpoints import (WEIGHTS_NAME, load_weights, meta_tensors, read_config, save_weights,
                                  write_config)
from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormer, DCFormerConfig, stage_tokens
from med3dvlm.models.projector import MixerProjector, ProjectorConfig
from med3dvlm.quantization import quantizer

MODEL_TYPE = "med3dvlm"
# Offset from the start of the placeholder run at which the image tokens are written.
PROMPT_STYLES = {"med3dvlm": 1, "exact": 0}
# What the official demo used: nucleus sampling, up to 512 new tokens.
OFFICIAL_GENERATION = {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "max_new_tokens": 512}
IGNORE_INDEX = -100
TIED_KEY = "language_model.lm_head.weight"


class PromptLayout:
    """What the pipeline reads from a model config, derived from its projector, LM and prompt style
    (shared by Med3DVLMConfig and M3DLaMedConfig)."""

    @property
    def num_image_tokens(self) -> int:
        return self.projector_config.num_tokens

    @property
    def max_context(self) -> int:
        """Longest prompt + answer, in tokens (image tokens included)."""
        return self.text_config.max_position_embeddings

    @property
    def image_offset(self) -> int:
        return PROMPT_STYLES[self.prompt_style]


@dataclass
class Med3DVLMConfig(PromptLayout):
    """Everything needed to rebuild the model; saved as config.json beside model.safetensors."""

    text_config: Qwen2Config
    vision_config: DCFormerConfig
    projector_config: ProjectorConfig
    image_token_id: int
    preprocess_preset: str = "med3dvlm"
    prompt_style: str = "med3dvlm"
    generation: dict[str, Any] = field(default_factory=lambda: dict(OFFICIAL_GENERATION))

    def __post_init__(self) -> None:
        text, vision, projector = self.text_config, self.vision_config, self.projector_config
        problems = []
        if self.prompt_style not in PROMPT_STYLES:
            problems.append(f"prompt_style {self.prompt_style!r} is not one of {sorted(PROMPT_STYLES)}")
        if not 0 <= self.image_token_id < text.vocab_size:
            problems.append(f"image_token_id {self.image_token_id} is outside the vocabulary "
                            f"of {text.vocab_size}")
        if projector.hidden_size != text.hidden_size:
            problems.append(f"projector width {projector.hidden_size} differs from the LM's "
                            f"{text.hidden_size}")
        low, high = vision.token_shapes()[-2:]
        if (low, high) != (projector.low_input_size, projector.high_input_size):
            problems.append(f"the encoder's last two stages give {low} and {high} tokens at input "
                            f"{vision.input_size} but the projector expects {projector.low_input_size} "
                            f"and {projector.high_input_size}")
        if problems:
            raise ModelError("The Med3DVLM config is inconsistent: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": MODEL_TYPE,
            "text_config": self.text_config.to_dict(),
            "vision_config": dataclasses.asdict(self.vision_config),
            "projector_config": dataclasses.asdict(self.projector_config),
            "image_token_id": self.image_token_id,
            "num_image_tokens": self.num_image_tokens,  # informative; derived from the projector
            "preprocess_preset": self.preprocess_preset,
            "prompt_style": self.prompt_style,
            "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Med3DVLMConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ModelError(f"The {source} describes model_type {data.get('model_type')!r}, not "
                             f"{MODEL_TYPE!r}; it is not a Med3DVLM folder saved by this package.")
        data = {k: v for k, v in data.items() if k not in ("model_type", "num_image_tokens")}
        try:
            return cls(
                text_config=Qwen2Config.from_dict(data.pop("text_config")),
                vision_config=DCFormerConfig(**data.pop("vision_config")),
                projector_config=ProjectorConfig(**data.pop("projector_config")),
                **data,
            )
        except (KeyError, TypeError) as error:
            raise ModelError(f"The {source} lacks or misnames a field ({error}); "
                             "it may be corrupted.") from error

    def save(self, folder: str | Path) -> None:
        write_config(folder, self.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> Med3DVLMConfig:
        return cls.from_dict(read_config(folder), source=f"config.json in {folder}")


def image_positions(input_ids: Tensor, image_token_id: int, num_image_tokens: int, offset: int) -> Tensor:
    """(B, N) sequence positions that receive the image tokens, found per row.

    Each row must hold a run of ``num_image_tokens`` placeholders; the image goes at
    ``run_start + offset + arange(N)`` (offset 1 = official Qwen behaviour, 0 = over the run).
    """
    is_image = input_ids == image_token_id
    if not bool(is_image.any(dim=1).all()):
        raise ValueError("Every prompt needs the <im_patch> placeholders; see med3dvlm.prompts.")
    start = is_image.int().argmax(dim=1, keepdim=True)  # first placeholder of each row
    if int(start.max()) + num_image_tokens + offset > input_ids.shape[1]:
        raise ValueError(f"Every prompt needs {num_image_tokens} <im_patch> placeholders"
                         + (" followed by text." if offset else "."))
    run = start + torch.arange(num_image_tokens, device=input_ids.device)
    if not bool(is_image.gather(1, run).all()):
        raise ValueError(f"Every prompt needs {num_image_tokens} consecutive <im_patch> placeholders.")
    return run + offset


def insert_image_tokens(embeds: Tensor, positions: Tensor, image_tokens: Tensor) -> Tensor:
    """``embeds`` with ``image_tokens`` (B or 1, N, H) written at ``positions`` (B, N); out of place."""
    rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None].expand_as(positions)
    image_tokens = image_tokens.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
    return embeds.index_put((rows, positions), image_tokens)


class Med3DVLM(nn.Module):
    """The vision-language model; ``language_model`` is transformers' own ``Qwen2ForCausalLM``."""

    def __init__(self, config: Med3DVLMConfig):
        super().__init__()
        self.config = config
        self.vision_tower = DCFormer(config.vision_config)
        self.mm_projector = MixerProjector(config.projector_config)
        self.language_model = Qwen2ForCausalLM(config.text_config)

    # ----- images -> LM-width tokens --------------------------------------------------------------
    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 1, D, H, W) in [0, 1] -> (B, num_image_tokens, hidden) image tokens."""
        maps = self.vision_tower(pixels.to(next(self.vision_tower.parameters()).dtype))
        return self.mm_projector(stage_tokens(maps[-2]), stage_tokens(maps[-1]))

    def build_inputs_embeds(self, input_ids: Tensor, image_tokens: Tensor) -> Tensor:
        """Token embeddings of ``input_ids`` with the image tokens inserted per the prompt style."""
        positions = self.image_positions(input_ids)
        embeds = self.language_model.get_input_embeddings()(input_ids)
        return insert_image_tokens(embeds, positions, image_tokens)

    def _image_tokens(self, image_tokens: Tensor | None, pixels: Tensor | None) -> Tensor:
        if (pixels is None) == (image_tokens is None):
            raise ValueError("Pass exactly one of image_tokens or pixels.")
        return self.encode_images(pixels) if image_tokens is None else image_tokens

    def image_positions(self, input_ids: Tensor) -> Tensor:
        return image_positions(input_ids, self.config.image_token_id, self.config.num_image_tokens,
                               self.config.image_offset)

    # ----- training / scoring ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        pixels: Tensor | None = None,
        image_tokens: Tensor | None = None,
        **lm_kwargs: Any,
    ):
        """LM output (``.loss``, ``.logits``) of prompts + answers, from ``pixels`` or ``image_tokens``.

        ``labels`` follow transformers (-100 = ignored, shifted inside the LM); image, placeholder
        and padding positions are ignored here whatever the caller put there.
        """
        embeds = self.build_inputs_embeds(input_ids, self._image_tokens(image_tokens, pixels))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is not None:
            ignored = (input_ids == self.config.image_token_id) | (attention_mask == 0)
            labels = labels.masked_fill(ignored, IGNORE_INDEX)
            labels = labels.scatter(1, self.image_positions(input_ids), IGNORE_INDEX)
        # Positions count real tokens only, as generate() does, so left-padded rows score the same.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, **lm_kwargs)

    # ----- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, image_tokens: Tensor | None, input_ids: Tensor,
                 attention_mask: Tensor | None = None, *, pixels: Tensor | None = None,
                 **generate_kwargs: Any) -> Tensor:
        """New token ids (B, T) after the prompt, from ``image_tokens`` (cacheable, see
        ``encode_images``) or ``pixels``; image tokens of batch 1 serve every prompt row.

        Delegates to ``Qwen2ForCausalLM.generate`` with ``inputs_embeds``, so KV cache, streamers,
        stopping criteria and sampling settings behave as in transformers.
        """
        embeds = self.build_inputs_embeds(input_ids, self._image_tokens(image_tokens, pixels))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            **generate_kwargs)

    # ----- save / load ----------------------------------------------------------------------------
    def _tied_keys(self) -> list[str]:
        return [TIED_KEY] if self.config.text_config.tie_word_embeddings else []

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes config.json and model.safetensors (a tied LM head is stored once)."""
        folder = Path(folder)
        self.config.save(folder)
        save_weights(self, folder / WEIGHTS_NAME, skip=self._tied_keys())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, quantization: str | None = None) -> Med3DVLM:
        """Loads a folder written by ``save_pretrained``, never holding two copies of the weights;
        ``quantization`` ('4bit' or '8bit') quantizes the LM's decoder while it loads."""
        folder = Path(folder)
        config = Med3DVLMConfig.load(folder)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, folder / WEIGHTS_NAME, device=device, dtype=dtype, skip=model._tied_keys(),
                     after_batch=quantizer(model, quantization, device))
        model.finish_loading(folder, device)
        return model.eval()

    def finish_loading(self, folder: Path, device: torch.device | str | None) -> None:
        """After assigning the stored tensors to a meta-built model: tie the LM head, compute the
        rotary frequencies (a non-persistent buffer, not in any file), check nothing is left."""
        lm = self.language_model
        if self._tied_keys():
            lm.lm_head.weight = lm.get_input_embeddings().weight
        rotary = lm.model.rotary_emb
        with torch.device(device or "cpu"):
            lm.model.rotary_emb = type(rotary)(config=lm.config)
        left = meta_tensors(self)
        if left:
            raise ModelError(f"Loading {folder} left tensors uninitialised ({', '.join(left[:5])}); "
                             "this model layout is not supported by this version.")
