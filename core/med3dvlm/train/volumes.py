"""Training-time volume handling: preprocess every volume of a dataset once and keep it in memory.

Preprocessing (read, reorient, window, resize) costs far more than a small model's step, so each
volume is turned into its model input once per run. The DCFormer features of a frozen encoder are
cached the same way for the VLM stages, where only the projector and the LM learn.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..models.dcformer import stage_tokens
from ..preprocess import PreprocessConfig, preprocess
from ..readers import read_volume


def load_pixels(paths: Iterable[str], config: PreprocessConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """Path -> model input (1, D, H, W), stored as float16 to halve the memory."""
    unique = sorted(set(map(str, paths)))
    return {path: preprocess(read_volume(path), config).to(torch.float16)
            for path in tqdm(unique, desc="preprocessing volumes", disable=not progress, unit="vol")}


def cached_pixels(cache: Path, paths: Iterable[str], config: PreprocessConfig,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """``load_pixels`` through a file cache; only volumes the cache lacks are preprocessed."""
    return _through_file(Path(cache), paths, lambda missing: load_pixels(missing, config, progress))


def _through_file(cache: Path, paths: Iterable[str], compute) -> dict:
    """Path -> ``compute``'s value, kept in ``cache``; only paths it lacks are computed.

    Keys are stored relative to the cache's folder, so a work folder that is moved, renamed or
    named by another relative path (``runs/x`` vs ``./runs/x``) still finds its values.
    """
    here = os.path.abspath(cache.parent)
    wanted = {str(p): Path(os.path.relpath(os.path.abspath(p), here)).as_posix() for p in paths}
    stored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    missing = [path for path, key in wanted.items() if key not in stored]
    if missing:
        stored.update({wanted[path]: value for path, value in compute(missing).items()})
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({key: stored[key] for key in wanted.values()}, cache)
    return {path: stored[key] for path, key in wanted.items()}


@torch.inference_mode()
def encoder_features(encoder, pixels: dict[str, torch.Tensor], batch_size: int = 16,
                     progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Path -> (low, high) stage tokens of a frozen DCFormer (the projector's two inputs)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    keys = list(pixels)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in tqdm(range(0, len(keys), batch_size), desc="encoding volumes", disable=not progress):
        chunk = keys[start:start + batch_size]
        maps = encoder(torch.stack([pixels[k] for k in chunk]).float().to(device))
        low, high = stage_tokens(maps[-2]).cpu(), stage_tokens(maps[-1]).cpu()
        for i, key in enumerate(chunk):
            out[key] = (low[i], high[i])
    return out


def cached_encoder_features(folder: Path, encoder, paths: Sequence[str],
                            pixels: Callable[[list[str]], dict[str, torch.Tensor]],
                            progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``encoder_features`` of ``paths`` through a file in ``folder`` named by the encoder's weights, so that
    a rerun of the stages after it (the demo's last two: 12 minutes) does not encode 8,150 volumes again
    (26-46 minutes on 2 cores); another encoder's file is removed. ``pixels(missing)`` (path -> model input, for at
    least those paths) is called only when features are missing: the demo's pixel caches are 8.5 GB to load."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    cache = Path(folder) / f"features-{digest.hexdigest()}.pt"
    for stale in cache.parent.glob("features-*.pt"):
        if stale != cache:
            stale.unlink()

    def encode(missing: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        volumes = pixels(missing)
        return encoder_features(encoder, {path: volumes[path] for path in missing}, progress=progress)

    return _through_file(cache, paths, encode)


class ImageTextDataset(Dataset):
    """(pixels, text[, targets]) for SigLIP training; ``targets`` maps an image to named tensors."""

    def __init__(self, pixels: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
                 targets: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.pixels, self.pairs, self.targets = pixels, list(pairs), targets

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image, text = self.pairs[index]
        return self.pixels[image], text, (self.targets[image] if self.targets is not None else None)


def image_text_collate(tokenizer, max_length: int):
    def collate(batch):
        images, texts, targets = zip(*batch)
        # right padding: the text tower's positions start at 0 whatever the batch (the shared
        # tokenizer pads on the left for generation)
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                           add_special_tokens=False, padding_side="right", return_tensors="pt")
        out = {"images": torch.stack(images).float(), "input_ids": tokens["input_ids"],
               "attention_mask": tokens["attention_mask"]}
        if targets[0] is not None:
            out.update({name: torch.stack([t[name] for t in targets]).float() for name in targets[0]})
        return out
    return collate


class LengthBatchedExamples(Dataset):
    """Instruction examples grouped into batches of similar length, each item one whole batch.

    Short VQA rows are then not padded to the length of a report, which more than halves the
    LM's work per epoch; the trainer shuffles the order of the batches (use batch_size=1). Lengths
    are bucketed coarsely (``bucket`` characters) and examples are in random order within a
    bucket: sorted by exact length, a batch holds one answer ("Cyst in the liver (21 mm)") for 32
    images, and each step teaches the LM that answer's prior instead of reading the image.
    """

    def __init__(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], examples: Sequence,
                 batch_size: int, seed: int = 0, bucket: int = 48) -> None:
        self.features = features
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        ordered = sorted((examples[i] for i in order), key=lambda ex: (len(ex.prompt) + len(ex.answer)) // bucket)
        self.batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return [(self.features[ex.image], ex) for ex in self.batches[index]]
