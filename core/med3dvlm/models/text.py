"""Text tower of the SigLIP model: a transformers encoder built offline from a config, plus pooling.

The encoder is returned as the plain transformers model (e.g. ``BertModel``, or
``DistilBertModel`` as in the official ClinicalBERT tower) so that, as an attribute named
``language_encoder``, its state-dict keys equal the official checkpoint's. It takes
``input_ids`` / ``attention_mask`` from any tokenizer whose vocabulary fits ``vocab_size``.
transformers is imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from med3dvlm.errors import ModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

POOLINGS = ("cls", "mean")


def _small_bert() -> dict[str, Any]:
    return {
        "vocab_size": 30522,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "max_position_embeddings": 512,
    }


@dataclass
class TextConfig:
    """``model_type`` and ``params`` are handed to ``transformers.AutoConfig.for_model``.

    ``pooling``: "cls" takes the first token's last hidden state (as the official tower),
    "mean" averages the last hidden states over non-padding tokens.
    """

    model_type: str = "bert"
    params: dict[str, Any] = field(default_factory=_small_bert)
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ModelError(f"Text pooling '{self.pooling}' is not supported; use one of {POOLINGS}.")

    def hf_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(self.model_type, **self.params)
        except (ValueError, KeyError) as error:
            raise ModelError(
                f"Cannot build a text encoder config of type '{self.model_type}': {error}"
            ) from error


def build_text_model(config: TextConfig) -> PreTrainedModel:
    """A randomly initialised transformers encoder (load weights afterwards)."""
    from transformers import AutoModel

    return AutoModel.from_config(config.hf_config())


def text_width(model: PreTrainedModel) -> int:
    """Width of the encoder's hidden states (``hidden_size``; DistilBERT maps it to ``dim``)."""
    return int(model.config.hidden_size)


def pool_text(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """(B, L, W) last hidden states -> (B, W)."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def encode_text_tokens(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None, pooling: str
) -> Tensor:
    """Run the encoder and pool: (B, L) token ids -> (B, W) text features."""
    vocab = model.config.vocab_size
    if input_ids.numel() and int(input_ids.max()) >= vocab:
        raise ModelError(
            f"Token id {int(input_ids.max())} is outside the text encoder's vocabulary of {vocab}; "
            "use the tokenizer the model was trained with."
        )
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return pool_text(hidden, attention_mask, pooling)
