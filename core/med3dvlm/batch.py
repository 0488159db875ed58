"""Reports for an archive: inputs expanded from folders, shared out over ``torchrun`` ranks, one
output file per volume written as soon as it is done, so that a rerun skips what is done.

    torchrun --nproc_per_node 4 -m med3dvlm.cli report scans/ --output-dir out/ --format json

Rank r takes every r-th volume (sorted), each rank writes its own volumes' files, and rank 0
writes ``summary.json`` once all ranks are through. A volume that fails is written as
``NAME.failed.json`` with the reason, and tried again by the next run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import Med3DVLMError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def volume_name(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if name.endswith(s)), name)


def expand(paths: Sequence[str]) -> list[Path]:
    """Files as given; a folder holding volume files gives those (sorted), any other folder is
    taken as one DICOM series."""
    volumes: list[Path] = []
    for given in map(Path, paths):
        inside = sorted(p for p in given.iterdir() if p.name.endswith(VOLUME_SUFFIXES)) if given.is_dir() else []
        volumes += inside or [given]
    names = [volume_name(p) for p in volumes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise Med3DVLMError(f"Several inputs are named {', '.join(twice)}; their outputs would overwrite each "
                            "other: report them into separate --output-dir folders.")
    return volumes


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def report_shard(pipe, volumes: Sequence[Path], out: Path, fmt: str, settings: dict, rank: int, world: int,
                 provenance: Callable[[Path, float], dict], batch_size: int = 4,
                 progress: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Reports for this rank's share of ``volumes`` not already in ``out``; (written, failed, skipped)."""
    suffix = ".json" if fmt == "json" else ".txt"
    mine = list(volumes)[rank::world]
    todo = [v for v in mine if not (out / (volume_name(v) + suffix)).exists()]
    written = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        started = time.perf_counter()
        try:
            texts = pipe.report_batch(chunk, batch_size=batch_size, **settings)
        except Med3DVLMError:
            texts = [None] * len(chunk)  # one bad volume must not cost its neighbours: one at a time
        seconds = (time.perf_counter() - started) / len(chunk)
        for volume, text in zip(chunk, texts):
            written += _write_one(pipe, volume, text, out, fmt, settings, provenance, seconds)
        if progress is not None:
            progress(len(chunk))
    return written, len(todo) - written, len(mine) - len(todo)


def _write_one(pipe, volume: Path, text, out: Path, fmt: str, settings: dict, provenance, seconds: float) -> bool:
    name = volume_name(volume)
    if text is None:
        started = time.perf_counter()
        try:
            text = pipe.report(volume, **settings)
        except Med3DVLMError as error:
            print(f"med3dvlm: {volume}: {error}", file=sys.stderr)
            write_atomically(out / f"{name}.failed.json", json.dumps({"volume": str(volume), "error": str(error)}))
            return False
        seconds = time.perf_counter() - started
    (out / f"{name}.failed.json").unlink(missing_ok=True)
    record = {"volume": str(volume), "model": pipe.model_name, "report": text,
              "provenance": provenance(volume, seconds)}
    write_atomically(out / (name + (".json" if fmt == "json" else ".txt")),
                     json.dumps(record, indent=1) + "\n" if fmt == "json" else text + "\n")
    return True


def write_summary(out: Path, volumes: Sequence[Path], fmt: str, world: int, model: str,
                  provenance: dict | None = None) -> dict:
    """Counts over all ranks' files, and what produced them (rank 0's record: each volume's file
    has its own, with its rank's device and preprocessing)."""
    suffix = ".json" if fmt == "json" else ".txt"
    done = [v for v in volumes if (out / (volume_name(v) + suffix)).exists()]
    failed = {str(v): json.loads((out / f"{volume_name(v)}.failed.json").read_text())["error"]
              for v in volumes if (out / f"{volume_name(v)}.failed.json").exists()}
    summary = {"model": model, "volumes": len(volumes), "reported": len(done), "failed": failed,
               "ranks": world, "provenance": provenance}
    write_atomically(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
