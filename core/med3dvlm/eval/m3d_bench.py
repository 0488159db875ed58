"""The Med3DVLM paper's M3D benchmark: retrieval, report generation, open and closed VQA.

Reads the M3D-Cap json and M3D-VQA csv files (``data.m3d`` layouts), runs the model through the
pipeline's public methods, appends one JSONL line per finished sample (a rerun skips those) and
writes ``summary.json``. What the official scripts (mirthAI/Med3DVLM ``src/eval``) do, and where
this differs:

- samples: the first N of the test split, as the official ``[:test_size]`` (2,000 for retrieval);
- retrieval: cosine of the SigLIP image and text embeddings, R@1/5/10 both ways (ties count against
  the true match here; the official ``topk`` breaks them by index);
- reports: the fixed prompt "Describe the findings of the medical image you see." (one of the
  official caption templates, which the official script draws at random);
- open VQA: every row of the VQA csv asked without its choices, scored against "Answer"
  (plus the rows of an open-only csv if given), as the official script;
- closed VQA ("generate", the default): the answer generated for the question + " Choices: ..."
  is right when it contains "{letter}.", as the official script; "likelihood" instead picks the
  choice the model finds most likely (``Pipeline.ask(choices=...)``);
- decoding is greedy unless asked otherwise (the official scripts sample, so their numbers vary).
"""

from __future__ import annotations

import base64
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.m3d import CAP_JSON, read_cap, read_vqa
from ..distributed import barrier
from ..errors import Med3DVLMError
from ..generation import ANSWER_SETTINGS, REPORT_SETTINGS
from ..prompts import format_choices
from .jsonl import RecordWriter, merge_shards, read_records
from .retrieval import recall_at_k, retrieval_ranks
from .text_metrics import Meteor, sentence_scores

TASKS = ("retrieval", "report", "vqa_open", "vqa_closed")
_CSV_SPLIT = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_LETTER = re.compile(r"\b([A-D])\.")


@dataclass
class BenchmarkConfig:
    root: Path                                  # data root: relative paths in the files resolve here
    out: Path                                   # per-sample JSONL files and summary.json
    split: str = "test"
    cap_json: Path | None = None                # default ROOT/M3D_Cap_npy/M3D_Cap.json
    vqa_csv: Path | None = None                 # default ROOT/M3D-VQA/M3D_VQA_{split}.csv
    vqa_open_csv: Path | None = None            # default ROOT/M3D-VQA/M3D_VQA_open_{split}.csv if present
    n: int = 2000                               # cap samples for retrieval and reports (paper: 2,000)
    n_vqa: int | None = None                    # rows of each VQA csv (default: all)
    tasks: tuple[str, ...] = TASKS
    closed_mode: str = "generate"               # or "likelihood"
    batch_size: int = 4
    generation: dict = field(default_factory=dict)  # max_new_tokens, do_sample, temperature, top_p
    bertscore_model: Path | None = None
    bertscore_layers: int | None = None
    wordnet: Path | None = None
    progress: bool = True
    rank: int = 0                               # under torchrun: this process takes every world-th sample
    world: int = 1

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        csv_split = _CSV_SPLIT.get(self.split, self.split)
        self.cap_json = Path(self.cap_json or self.root / CAP_JSON)
        self.vqa_csv = Path(self.vqa_csv or self.root / "M3D-VQA" / f"M3D_VQA_{csv_split}.csv")
        default_open = self.root / "M3D-VQA" / f"M3D_VQA_open_{csv_split}.csv"
        self.vqa_open_csv = Path(self.vqa_open_csv) if self.vqa_open_csv else (
            default_open if default_open.is_file() else None)
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise Med3DVLMError(f"Unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}.")
        if self.closed_mode not in ("generate", "likelihood"):
            raise Med3DVLMError(f"closed_mode must be 'generate' or 'likelihood', not {self.closed_mode!r}.")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _b64(vector: torch.Tensor) -> str:
    return base64.b64encode(vector.float().cpu().numpy().astype("<f4").tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


class _Volumes:
    """Reads each volume file once while consecutive rows ask about it (VQA csvs group rows by image)."""

    def __init__(self, pipe) -> None:
        self.pipe, self.path, self.volume = pipe, None, None

    def __call__(self, path: Path):
        if path != self.path:
            self.path, self.volume = path, self.pipe.as_volume(path)
        return self.volume


class M3DBenchmark:
    def __init__(self, pipe, config: BenchmarkConfig) -> None:
        self.pipe, self.cfg = pipe, config
        self.meteor = Meteor(config.wordnet)
        self.volumes = _Volumes(pipe)
        gen = {k: v for k, v in config.generation.items() if v is not None}
        self.report_settings = REPORT_SETTINGS.updated(**gen)
        self.answer_settings = ANSWER_SETTINGS.updated(**gen)
        self.skipped: dict[str, str] = {}

    def _mine(self, samples: list) -> list:
        """This rank's share of all the samples (all of them in one process): fixed by position, so
        that it does not depend on what another rank has finished already."""
        return samples[self.cfg.rank::self.cfg.world]

    def _bar(self, total: int, done: int, desc: str):
        return tqdm(total=total, initial=done, desc=desc, unit="sample", disable=not self.cfg.progress)

    # ----- data --------------------------------------------------------------------------------------
    def cap_items(self):
        return read_cap(self.cfg.cap_json, self.cfg.split, data_root=self.cfg.root)[: self.cfg.n]

    def vqa_rows(self) -> list[tuple[str, object, bool]]:
        """(id, row, from_open_only_csv) of the VQA csv and the open-only csv."""
        rows = []
        for path, open_only in ((self.cfg.vqa_csv, False), (self.cfg.vqa_open_csv, True)):
            if path is None:
                continue
            items = read_vqa(path, data_root=self.cfg.root)[: self.cfg.n_vqa]
            rows += [(f"{path.name}:{i}", item, open_only) for i, item in enumerate(items)]
        return rows

    # ----- tasks -------------------------------------------------------------------------------------
    def run(self) -> dict[str, list[dict]]:
        """Runs the tasks; returns each task's records of the current samples, in sample order."""
        wanted, shard = {}, self.cfg.rank if self.cfg.world > 1 else None
        for task in self.cfg.tasks:
            if task == "retrieval" and self.pipe.retrieval is None:
                self.skipped[task] = f"model {self.pipe.model_name} has no SigLIP retrieval towers"
                continue
            wanted[task] = getattr(self, f"_{task}")(RecordWriter(self.cfg.out / f"{task}.jsonl", shard))
        barrier()  # all ranks' samples are written
        if self.cfg.rank != 0:
            return {}  # rank 0 merges and scores
        records = {}
        for task in wanted:
            merge_shards(self.cfg.out / f"{task}.jsonl")
            records[task] = read_records(self.cfg.out / f"{task}.jsonl")
        # a rerun with a smaller N or other csvs reports on the samples asked for only
        return {task: [records[task][key] for key in keys] for task, keys in wanted.items()}

    @torch.inference_mode()
    def _retrieval(self, writer: RecordWriter) -> None:
        """Unit-length embeddings per sample (base64 float32), ranked once all are there."""
        model, pipe = self.pipe.retrieval, self.pipe
        dtype = next(model.parameters()).dtype
        items = [(f"{i}:{_rel(c.image_path, self.cfg.root)}", c) for i, c in enumerate(self.cap_items())]
        todo = [(key, c) for key, c in self._mine(items) if key not in writer.done]
        bar = self._bar(len(items), len(items) - len(todo), "retrieval")
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start:start + self.cfg.batch_size]
            pixels = torch.cat([pipe.pixels(c.image_path) for _, c in chunk]).to(dtype)
            # tokenised as Pipeline.retrieve does: no special tokens, cut at the text tower's length
            batch = pipe.tokenizer([c.text for _, c in chunk], return_tensors="pt", padding=True, truncation=True,
                                   max_length=model.max_text_length, add_special_tokens=False,
                                   padding_side="right")  # BERT's positions start at 0 for every text
            images = model.encode_image(pixels)
            texts = model.encode_text(batch["input_ids"].to(pipe.device), batch["attention_mask"].to(pipe.device))
            for (key, c), img, txt in zip(chunk, images, texts):
                writer.write({"id": key, "image": _rel(c.image_path, self.cfg.root), "image_embedding": _b64(img),
                              "text_embedding": _b64(txt)})
            bar.update(len(chunk))
        bar.close()
        return [key for key, _ in items]

    def _report(self, writer: RecordWriter) -> None:
        items = [(f"{i}:{_rel(c.image_path, self.cfg.root)}", c) for i, c in enumerate(self.cap_items())]
        todo = [(key, c) for key, c in self._mine(items) if key not in writer.done]
        bar = self._bar(len(items), len(items) - len(todo), "reports")
        settings = asdict(self.report_settings)
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start:start + self.cfg.batch_size]
            texts = self.pipe.report_batch([c.image_path for _, c in chunk], batch_size=len(chunk), **settings)
            for (key, c), text in zip(chunk, texts):
                writer.write({"id": key, "image": _rel(c.image_path, self.cfg.root), "reference": c.text,
                              "prediction": text, **sentence_scores(text, c.text, self.meteor)})
            bar.update(len(chunk))
        bar.close()
        return [key for key, _ in items]

    def _vqa_open(self, writer: RecordWriter) -> None:
        rows = self.vqa_rows()
        todo = [r for r in self._mine(rows) if r[0] not in writer.done]
        settings = asdict(self.answer_settings)
        for key, q, _ in tqdm(todo, total=len(rows), initial=len(rows) - len(todo), desc="open VQA", unit="sample",
                              disable=not self.cfg.progress):
            answer = self.pipe.ask(self.volumes(q.image_path), q.question, **settings)
            writer.write({"id": key, "image": _rel(q.image_path, self.cfg.root), "question_type": q.question_type,
                          "question": q.question, "reference": q.answer, "prediction": answer,
                          **sentence_scores(answer, q.answer, self.meteor)})
        return [key for key, _, _ in rows]

    def _vqa_closed(self, writer: RecordWriter) -> None:
        rows = [r for r in self.vqa_rows() if r[1].closed]
        todo = [r for r in self._mine(rows) if r[0] not in writer.done]
        settings = asdict(self.answer_settings)
        for key, q, _ in tqdm(todo, total=len(rows), initial=len(rows) - len(todo), desc="closed VQA",
                              unit="sample", disable=not self.cfg.progress):
            volume = self.volumes(q.image_path)
            if self.cfg.closed_mode == "likelihood":
                answer = self.pipe.ask(volume, q.question, choices=list(q.choices))
            else:  # the official prompt: the question, then " Choices: A. .. B. .. C. .. D. .."
                answer = self.pipe.ask(volume, q.question + format_choices(q.choices), **settings)
            found = _LETTER.search(answer)
            writer.write({"id": key, "image": _rel(q.image_path, self.cfg.root), "question_type": q.question_type,
                          "question": q.question, "choices": list(q.choices), "answer_choice": q.answer_choice,
                          "prediction": answer, "predicted_choice": found.group(1) if found else None,
                          "correct": f"{q.answer_choice}." in answer})
        return [key for key, _, _ in rows]

    # ----- retrieval scores --------------------------------------------------------------------------
    @staticmethod
    def retrieval_scores(records: list[dict]) -> tuple[dict, list[dict]]:
        images = np.stack([_unb64(r["image_embedding"]) for r in records])
        texts = np.stack([_unb64(r["text_embedding"]) for r in records])
        similarity = images @ texts.T
        ranks_i2t, ranks_t2i = retrieval_ranks(similarity)
        per_sample = [{"id": r["id"], "image_to_text_rank": int(a) + 1, "text_to_image_rank": int(b) + 1}
                      for r, a, b in zip(records, ranks_i2t, ranks_t2i)]
        return recall_at_k(similarity, (1, 5, 10)), per_sample

