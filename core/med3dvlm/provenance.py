"""What produced an output: model and weights, package, preprocessing, generation settings, device.

Every JSON the CLI and the model server return carries such a record (``record``), and the Slicer
module keeps it on the text and table nodes, so that a saved report says how it was made.

The weights are named by a BLAKE2b digest of their files' bytes, not of a header: two checkpoints
with the same tensor names and shapes would share a header. BLAKE2b runs at about 0.9 GB/s per
core and the shards of a release are hashed in parallel threads (measured: 4 x 400 MB in 1.0 s on
2 cores), so a 15 GB 7B release costs ~10 s once, disk permitting. The digest of each file version
(path, size, modification time) is remembered in ``~/.cache/med3dvlm/weights.json``, so every
later load costs only a ``stat`` per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
CHUNK = 1 << 22
_seed: int | None = None  # set by ``deterministic``; None: the process was not seeded


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
    files = [(folder, path) for folder in folders
             for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())]
    # The shards are hashed side by side: hashlib releases the GIL, so a 4-shard 7B costs one shard's time.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: file_digest(item[1], remembered), files))
    total = hashlib.blake2b(digest_size=16)
    for (folder, path), digest in zip(files, digests):
        total.update(f"{path.relative_to(folder)}:{digest}\n".encode())
    if len(remembered) != known:
        try:  # atomically: torchrun ranks load (and write this) at the same time
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}")
            partial.write_text(json.dumps(remembered, indent=0))
            partial.replace(cache)
        except OSError:
            pass  # a read-only home: the digest is recomputed next time
    return total.hexdigest()


def deterministic(seed: int = 0) -> None:
    """Same text on rerun on the same machine: fixed seeds (sampling, if asked for, is then
    reproducible too) and deterministic kernels."""
    import numpy as np
    import torch

    global _seed
    _seed = seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record(pipe, task: str, *, preprocessing: dict | None = None, generation: dict | None = None) -> dict:
    """The provenance of ``task`` done by ``pipe`` (a Pipeline, or anything with its ``describe()``
    and ``weights``), as plain JSON. ``preprocessing``: the preset and what was applied to each
    volume; ``generation``: the settings used. Callers add ``seconds``, the time taken."""
    torch = sys.modules.get("torch")  # not imported (a stand-in model): no deterministic kernels either
    about = pipe.describe()
    made = {"task": task, "package": f"med3dvlm {__version__}", "model": about["name"],
            "weights_blake2b": getattr(pipe, "weights", None), "device": about["device"],
            "dtype": about["dtype"], "quantization": about["quantization"],
            "preprocessing": preprocessing, "generation": generation,
            "seed": _seed, "deterministic": bool(torch and torch.are_deterministic_algorithms_enabled()),
            "created": now()}
    return json.loads(json.dumps(made))  # plain JSON (lists, not tuples): what a server sends
