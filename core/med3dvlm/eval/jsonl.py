"""Per-sample JSONL files that a rerun resumes: finished samples are read back and skipped.

Each line is one finished sample with a unique ``id``, appended and flushed as soon as it is done,
so an interruption loses at most the sample in progress. A line cut short by a crash is dropped
on reading (and rewritten when that sample is redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_records(path: str | Path) -> dict[str, dict]:
    """id -> record of every complete line; the last line wins if an id repeats."""
    records: dict[str, dict] = {}
    path = Path(path)
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by an interruption
                continue
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
    return records


class RecordWriter:
    """Appends records to a JSONL file; ``done`` holds the ids already there."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_records(self.path)
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
