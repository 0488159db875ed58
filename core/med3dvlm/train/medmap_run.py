"""MedMAP on the user's own MRI data: both stages and the validation thresholds on a MedMoM-layout
dataset (``data.medmom``), single process or under torchrun. ``med3dvlm train medmap`` calls it.

Output folder:

    config.json, model.safetensors, tokenizer files   the detector (``med3dvlm detect --model OUT``)
    validation.json                                   thresholds and per-label validation figures
    tokenizer/                                        BPE of the training reports (reused on resume)
    pretrain/, finetune/                              each stage's run_config.json, train_log.jsonl,
                                                      checkpoint-last/

Resuming (``resume=True``): each stage continues from its ``checkpoint-last`` when there is one.
A finished stage only reloads its weights; more epochs than before continue its run. When
pre-training moves on, an older fine-tuning run no longer matches the encoder and starts afresh.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data.medmom import read_medmom, table_labels, table_sequences
from ..data.medmom_samples import medmom_samples
from ..detection import Detector, detector_preprocess, subsets_of
from ..distributed import barrier, cleanup, init_distributed
from ..errors import Med3DVLMError
from ..eval.detection_eval import subset_reports, to_json
from ..models.medmap import MedMAPConfig
from ..tokenizer import load_tokenizer, train_tokenizer
from .checkpoint import CHECKPOINT_DIR
from .config import TrainConfig
from .medmap import build_model, finetune, pretrain, subset_thresholds

TOKENIZER_DIR = "tokenizer"
STAGES = ("pretrain", "finetune")


def _checkpoint_step(run: Path) -> int | None:
    state = run / CHECKPOINT_DIR / "training_state.pt"
    return int(torch.load(state, weights_only=True)["step"]) if state.is_file() else None


def _stage_config(config: TrainConfig, run: Path, resume: bool, is_main: bool) -> TrainConfig:
    """The stage's config in its own folder; a stage that does not resume starts from an empty one."""
    resume = resume and _checkpoint_step(run) is not None
    if not resume and is_main:
        shutil.rmtree(run, ignore_errors=True)
    barrier()
    return replace(config, output_dir=str(run), resume=resume)


def _tokenizer(folder: Path, texts: list[str], vocab_size: int, resume: bool, is_main: bool):
    """Rank 0 trains (or, resuming, keeps) the tokenizer; every rank reads the same files."""
    if is_main and not (resume and (folder / "tokenizer.json").is_file()):
        train_tokenizer(texts, vocab_size=vocab_size).save_pretrained(str(folder))
    barrier()
    return load_tokenizer(folder)


def train_medmap(data: str | Path, out: str | Path, stages: dict[str, TrainConfig], *,
                 architecture: dict[str, Any] | None = None, vocab_size: int = 1000,
                 full_study_p: float = 0.25, resume: bool = False) -> dict | None:
    """Pre-trains and fine-tunes on the train split, picks thresholds on validation, saves the detector.

    ``stages`` maps "pretrain" and "finetune" to their TrainConfig (output folders are set here);
    ``architecture`` holds MedMAPConfig fields (labels and sequences come from the table);
    ``full_study_p``: how often fine-tuning shows a study whole rather than one or two of its volumes.
    Returns the validation summary on rank 0, None on other ranks.
    """
    out = Path(out)
    info = init_distributed(stages["pretrain"].device)
    studies = read_medmom(data)
    labels, sequences = table_labels(studies), table_sequences(studies)
    config = MedMAPConfig(labels, sequences=sequences, **(architecture or {}))
    if config.evidence:
        raise Med3DVLMError("Finding evidence learns from the phantoms' lesion masks, which a MedMoM table does "
                            "not hold; build it with python -m med3dvlm.train.medmap.")
    preprocessing = detector_preprocess(config.input_size)
    by_split = {split: [s for s in studies if s.split == split] for split in ("train", "validation")}
    if not by_split["train"]:
        raise Med3DVLMError(f"{data} has no studies in the train split.")
    train_set = medmom_samples(by_split["train"], labels, preprocessing, progress=info.is_main)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out / TOKENIZER_DIR, [s.report for s in train_set] + config.prompts, vocab_size,
                           resume, info.is_main)
    torch.manual_seed(stages["pretrain"].seed)  # the same initial weights on every rank and every resume
    model = build_model(config, tokenizer)

    pre_run, ft_run = out / "pretrain", out / "finetune"
    done_before = _checkpoint_step(pre_run) if resume else None
    pre = pretrain(model, train_set, tokenizer, _stage_config(stages["pretrain"], pre_run, resume, info.is_main))
    ft_resume = resume and pre.steps == done_before
    ft = finetune(model, train_set, _stage_config(stages["finetune"], ft_run, ft_resume, info.is_main),
                  full_study_p=full_study_p)
    summary = _thresholds_and_save(out, model, tokenizer, by_split["validation"], train_set, preprocessing,
                                   {"pretrain": pre, "finetune": ft}) if info.is_main else None
    barrier()  # the other ranks wait for rank 0's files before the group closes
    cleanup()
    return summary


def _thresholds_and_save(out: Path, model, tokenizer, validation_studies, train_set, preprocessing,
                         results: dict) -> dict:
    labels, sequences = model.config.labels, model.config.sequences
    if validation_studies:
        validation, source = medmom_samples(validation_studies, labels, preprocessing), "validation"
    else:  # thresholds fitted on training studies are optimistic, but a detector needs some
        validation, source = train_set, "train"
    thresholds = subset_thresholds(model, validation, subsets_of(sequences))
    Detector(model.eval(), tokenizer, thresholds, preprocessing).save(out)
    summary = {"thresholds_from": source, "studies": {"train": len(train_set), source: len(validation)},
               "steps": {name: r.steps for name, r in results.items()},
               "final_loss": {name: r.losses[-1] if r.losses else None for name, r in results.items()},
               "thresholds": thresholds,
               "subsets": to_json(subset_reports(model, validation, thresholds, sequences))}
    (out / "validation.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
