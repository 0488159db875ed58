"""What produced an output: model and weights, package, preprocessing, generation settings, device.

Every JSON the CLI and the model server return carries such a record, and the Slicer module keeps
it on the text and table nodes, so that a saved report says how it was made. The weights are
named by a BLAKE2b digest of their files' bytes; a 15 GB release takes a while to hash, so the
digest is computed once per file version (path, size, modification time) and remembered in
``~/.cache/med3dvlm/weights.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
CHUNK = 1 << 22


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "med3dvlm" / "weights.json"


def file_digest(path: Path, remembered: dict) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in remembered:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as file:
            while chunk := file.read(CHUNK):
                digest.update(chunk)
        remembered[key] = digest.hexdigest()
    return remembered[key]


def weights_digest(*folders: Path) -> str:
    """One digest of every weight file under ``folders`` (sub-folders too: SigLIP towers, detector),
    with its path relative to its folder, so that renaming the model folder keeps the digest."""
    cache = _cache_file()
    try:
        remembered = json.loads(cache.read_text())
    except (OSError, ValueError):
        remembered = {}
    known = len(remembered)
    total = hashlib.blake2b(digest_size=16)
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
            total.update(f"{path.relative_to(folder)}:{file_digest(path, remembered)}\n".encode())
    if len(remembered) != known:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(remembered, indent=0))
        except OSError:
            pass  # a read-only home: the digest is recomputed next time
    return total.hexdigest()


def deterministic(seed: int = 0) -> None:
    """Same text on rerun on the same machine: fixed seeds and deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
