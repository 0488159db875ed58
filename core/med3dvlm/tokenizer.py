"""A small byte-level BPE tokenizer for the demo model, trained offline with `tokenizers`.

It follows the conventions of Qwen2's tokenizer, which the official weights use: no BOS token,
``<|endoftext|>`` as end of sequence, and the image placeholder ``<im_patch>`` as one added
special token. Padding has its own token so that masking pads never masks a real end of text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .errors import ModelError
from .prompts import IMAGE_TOKEN

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Learns a byte-level BPE vocabulary from ``texts``; any string encodes (no unknown token)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a backend tokenizer, with this project's special tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="left",  # generation appends on the right, so prompts are padded on the left
    )
    return tokenizer


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved with ``save_pretrained``; checks that it knows ``<im_patch>``."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(f"The model folder {folder} has no tokenizer.json; "
                         "save the tokenizer beside the model.")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as error:  # a broken JSON file surfaces as many exception types
        raise ModelError(f"The tokenizer in {folder} cannot be read ({error}); "
                         "the files may be corrupted.") from error
    image_ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(image_ids) != 1:
        raise ModelError(f"The tokenizer in {folder} has no single {IMAGE_TOKEN} token; "
                         "it does not belong to a Med3DVLM model.")
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
