"""Per-sample JSONL files that a rerun resumes: finished samples are read back and skipped.

Each line is one finished sample with a unique ``id``, appended and flushed as soon as it is done,
so an interruption loses at most the sample in progress. A line cut short by a crash is dropped
on reading (and rewritten when that sample is redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def shard_path(path: Path, rank: int) -> Path:
    """Where torchrun rank ``rank`` appends its records of ``path`` (merged by rank 0 at the end)."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _files(path: Path) -> list[Path]:
    return [p for p in [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))] if p.is_file()]


def read_records(path: str | Path) -> dict[str, dict]:
    """id -> record of every complete line of ``path`` and of its ranks' shards; the last line wins
    if an id repeats."""
    records: dict[str, dict] = {}
    for file in _files(Path(path)):
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by an interruption
                    continue
                if isinstance(record, dict) and "id" in record:
                    records[str(record["id"])] = record
    return records


def merge_shards(path: str | Path) -> None:
    """One file again after a torchrun run: the ranks' shards folded into ``path``."""
    path = Path(path)
    shards = _files(path)[1:] if path.is_file() else _files(path)
    if shards:
        rewrite(path, list(read_records(path).values()))
        for shard in shards:
            shard.unlink()


class RecordWriter:
    """Appends records to a JSONL file (a rank's own shard of it under torchrun); ``done`` holds the
    ids already there, in the file or any rank's shard."""

    def __init__(self, path: str | Path, rank: int | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_records(path)
        self.path = path if rank is None else shard_path(path, rank)
        if self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            with open(self.path, "a", encoding="utf-8") as fh:  # end a cut line so the next one starts clean
                fh.write("\n")

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
        self.records[str(record["id"])] = record


def rewrite(path: str | Path, records: list[dict]) -> None:
    """Replaces the file atomically (used to add fields computed over the whole set, e.g. BERTScore)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)
