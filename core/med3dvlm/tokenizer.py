"""A small byte-level BPE tokenizer for the demo model, trained offline with `tokenizers`.

It follows the conventions of Qwen2's tokenizer, which the official weights use: no BOS token,
``<|endoftext|>`` as end of sequence, and the image placeholder ``<im_patch>`` as one added
special token. Padding has its own token so that masking pads never masks a real end of text.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import ModelError
from .install_hint import install_hint
from .prompts import IMAGE_TOKEN

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
FAST_FILE, SENTENCEPIECE_FILE = "tokenizer.json", "tokenizer.model"
BPE_FILES = ("vocab.json", "merges.txt")  # what a slow byte-level BPE tokenizer (Qwen2's) saves


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


def load_release_tokenizer(folder: str | Path, config=None):
    """A released model's own tokenizer: local files only, no remote code.

    ``tokenizer.json`` is optional: the Med3DVLM (Qwen2) release ships the byte-level BPE files its
    slow tokenizer saved (``vocab.json`` + ``merges.txt``), M3D-LaMed releases only the SentencePiece
    file (``tokenizer.model``). transformers 5 turns either into a fast tokenizer that gives the same
    ids as the slow one did; SentencePiece needs sentencepiece and protobuf. ``config`` (the language
    model's config) spares transformers from parsing the release's custom config.json.
    """
    folder = Path(folder)
    options = {}
    if not _has(folder, FAST_FILE) and not _has(folder, *BPE_FILES):
        if not _has(folder, SENTENCEPIECE_FILE):
            raise ModelError(f"The model folder {folder} has no tokenizer ({FAST_FILE}, {' + '.join(BPE_FILES)}, or "
                             f"{SENTENCEPIECE_FILE}); the download is incomplete.")
        missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
        if missing:
            raise ModelError(f"The tokenizer in {folder} is a SentencePiece model ({SENTENCEPIECE_FILE}); reading it "
                             f"needs sentencepiece and protobuf: {install_hint('sentencepiece', 'protobuf')}.")
        # The slow class that wrote it defaulted to legacy=True when the key is absent; transformers 5 to False.
        options["legacy"] = _tokenizer_config(folder).get("legacy", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=config, local_files_only=True,
                                                  trust_remote_code=False, **options)
    except Exception as error:  # damaged or missing files surface as many exception types
        raise ModelError(f"The tokenizer in {folder} cannot be loaded ({error}); its files ({FAST_FILE}, "
                         f"{' + '.join(BPE_FILES)} or {SENTENCEPIECE_FILE}, tokenizer_config.json) may be incomplete "
                         "or corrupted.") from error
    if options.get("legacy"):
        _as_legacy_slow(tokenizer)
    return tokenizer


def _as_legacy_slow(tokenizer) -> None:
    """The legacy slow tokenizer gave every text piece between special tokens a "▁" prefix, even one that
    starts with a space (" Is" -> "▁", "▁Is"); a Metaspace pre-tokenizer skips it there. Prepending in
    the normalizer, as transformers' legacy fast Llama tokenizers did, gives the slow ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.pre_tokenizer) is pre_tokenizers.Metaspace:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None


def _has(folder: Path, *names: str) -> bool:
    return all((folder / name).is_file() for name in names)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package ("google")
        return False


def _tokenizer_config(folder: Path) -> dict:
    try:
        data = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        data = None  # transformers reports a damaged file itself
    return data if isinstance(data, dict) else {}
