"""MedMAP training: vision-language pre-training per sequence, then detection fine-tuning.

1. ``pretrain``: each study contributes one of its sequences (drawn anew every epoch) paired with
   its report; image and text towers learn with the pairwise sigmoid loss of ``models.siglip``.
2. ``finetune``: multi-label BCE on the class-query logits; the text tower is frozen (bit-identical
   afterwards), the vision side and the head learn (the zero-shot scorer, i.e. the image
   projection, t' and b, is kept as pre-trained). Every study shows all its sequences a quarter
   of the time, else one or two of them, so one model serves full studies and single volumes.
3. Thresholds per label are chosen on validation data (F1), for the full study and per sequence.

With finding evidence (``MedMAPConfig.evidence``, the shipped demo's recipe) the detector's
``FindingSegmenter`` first learns on lesion-centred crops of the training studies' sequences
(``train.lesion_crops``, the phantoms' own masks), its learning curve measured on the validation
studies; after pre-training, each label's calibration a_l, c_l is fitted to the training studies'
evidence (``calibrate``), and fine-tuning trains head and calibration together with the segmenter
fixed, so the head learns what the evidence misses.

``train_medmap_demo`` runs all of it on fresh MRI phantoms and writes the shipped demo detector;
``python -m med3dvlm.train.medmap OUT_DIR`` does the same from the command line. ``train.medmap_run``
runs the stages on the user's own MedMoM-layout data (``med3dvlm train medmap``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.medmom import PHANTOM_LABELS, phantom_mr_study
from ..data.medmom_samples import StudySample, collate_studies, stacked_targets, with_sequences
from ..data.reports import write_report
from ..detection import Detector, detector_preprocess, score_studies, subsets_of
from ..eval.classification import f1_score, per_class_auc, select_threshold
from ..models.findings import STEM_STRIDE
from ..models.medmap import MedMAPConfig, MedMAPModel, tokenize
from ..data.phantoms import Phantom
from ..models.siglip import sigmoid_loss
from ..preprocess import PreprocessConfig, preprocess
from ..tokenizer import train_tokenizer
from ..volume import MR_SEQUENCES
from .config import TrainConfig
from .dense import N_DENSE_OUTPUTS, cached_examples, phantom_targets, token_grid_losses
from .lesion_crops import segmenter_auc, segmenter_targets, train_segmenter
from .trainer import TrainResult, train

logger = logging.getLogger(__name__)

HEAD_PARAMS = ("query_proj", "key_proj", "pos_embed", "label_query", "label_bias")
TEXT_PARAMS = ("language_encoder", "mm_language_proj")
ZERO_SHOT_PARAMS = ("mm_vision_proj", "t_prime", "bias")
SEGMENTER_PARAMS = ("evidence",)                       # trained on crops alone
CALIBRATION_PARAMS = ("evidence_scale", "evidence_bias")
# The CT segmenter's recipe for longer: validation AUC swings (0.86 -> 0.84 -> 0.88) up to round 7,
# holds at 0.96 from round 11, and the detector takes a copy decayed over ``decay_steps`` more
# (0.97). After 7 rounds the test study macro AUC was 0.881, after 19 0.949 (December 2026).
SEGMENTER = {"rounds": 19, "steps_per_round": 250, "batch_size": 16, "lr": 3e-3, "decay_steps": 375}
# At 32 x 64 x 64 a calcification covers 7-8 voxels: the segmenter keeps the full grid, and its
# crops are smaller in-plane to pay for it (a step costs ~2.5x the half grid's, not 4.5x).
EVIDENCE_STRIDE, EVIDENCE_CROP = (1, 1, 1), (16, 24, 24)
SEED_OFFSETS = {"train": 100_000, "validation": 200_000, "test": 300_000}  # disjoint phantom seeds


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---- data ---------------------------------------------------------------------------------
def _phantom_study(args) -> dict:
    seed, input_size, sequences, shape, findings, stride = args
    config = PreprocessConfig(shape=tuple(input_size))
    study = phantom_mr_study(int(seed), sequences, shape, findings)
    # The sequences share one geometry; the masks follow the first one's preprocessing.
    phantom = Phantom(next(iter(study.volumes.values())), study.truth)
    return {"pixels": torch.cat([preprocess(v, config) for v in study.volumes.values()]).half(),
            "pairs": sorted(list(pair) for pair in study.truth.pairs),
            "report": write_report(study.truth, np.random.default_rng(seed)),
            "targets": phantom_targets(phantom, config), "findings": segmenter_targets(phantom, config, stride)}


def phantom_samples(seeds: Sequence[int], labels: Sequence[tuple[str, str]], input_size: tuple[int, int, int],
                    sequences: Sequence[str] = MR_SEQUENCES, shape=None, findings: Sequence[int] | None = None,
                    progress: bool = False, cache: Path | None = None, workers: int = 2,
                    stride: Sequence[int] = STEM_STRIDE) -> list[StudySample]:
    """Synthetic MRI studies (``data.phantoms``), preprocessed once to the model input size, with
    their dense and segmenter targets (on the grid of a segmenter of stem ``stride``).

    ``findings`` (e.g. (2, 3, 4)) sets how many findings a study holds, cycling over the seeds;
    None keeps the phantoms' own 0-2. More findings per study = more positives per training step.
    ``cache``: a file that keeps the studies made (``workers`` processes make the missing ones).
    """
    jobs = {f"mr:{seed}:{tuple(input_size)}:{tuple(sequences)}:{shape}:{findings}:{tuple(stride)}":
            (seed, tuple(input_size), tuple(sequences), shape, findings, tuple(stride)) for seed in seeds}
    if cache is None:
        made = [_phantom_study(job) for job in tqdm(jobs.values(), desc="MRI phantoms", disable=not progress,
                                                    unit="study")]
    else:
        made = list(cached_examples(cache, jobs, _phantom_study, workers).values())
    out = []
    for study in made:
        pairs = {tuple(pair) for pair in study["pairs"]}
        pixels = dict(zip(sequences, study["pixels"].split(1)))
        y = torch.tensor([float(pair in pairs) for pair in labels])
        out.append(StudySample(pixels, study["report"], y, study["targets"], study["findings"]))
    return out


def segmenter_examples(samples: Sequence[StudySample], sequences: Sequence[str]) -> list[dict]:
    """The segmenter's examples: each study's sequences as channels (in ``sequences`` order) and its targets."""
    return [{"pixels": torch.cat([s.pixels[q] for q in sequences]), **s.findings} for s in samples]


def build_model(config: MedMAPConfig, tokenizer) -> MedMAPModel:
    """A fresh model whose text vocabulary is the tokenizer's, with its class prompts set."""
    params = {**config.text.params, "vocab_size": len(tokenizer)}
    config = replace(config, text=replace(config.text, params=params))
    model = MedMAPModel(config)
    model.use_tokenizer(tokenizer)
    return model


# ---- stage 1: pre-training ----------------------------------------------------------------
class _PairData(Dataset):
    """Study i -> (one random sequence's volume, its sequence index, the report)."""

    def __init__(self, samples: Sequence[StudySample], sequences: Sequence[str]) -> None:
        self.samples, self.sequences = list(samples), tuple(sequences)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        names = list(sample.pixels)
        name = names[int(torch.randint(len(names), ()))]
        return sample.pixels[name].float(), self.sequences.index(name), sample.report, sample.targets


@contextmanager
def _organ_aware(model: MedMAPModel, samples: Sequence[StudySample]):
    """With phantom targets, a per-token head learns organ, kind and organ x kind maps next to the
    stage's own loss (``train.dense``): the tokens learn where they look. Removed afterwards."""
    if samples[0].targets is None:
        yield
        return
    model.dense_head = torch.nn.Linear(model.config.embed_dim, N_DENSE_OUTPUTS).to(model.bias.device)
    try:
        yield
    finally:
        del model.dense_head


def _dense(m: MedMAPModel, tokens: torch.Tensor, batch: dict) -> torch.Tensor:
    return token_grid_losses(m.dense_head, tokens, m.config.grid(), batch) if "organs" in batch else 0.0


def pretrain(model: MedMAPModel, samples: Sequence[StudySample], tokenizer, config: TrainConfig) -> TrainResult:
    """Aligns single-sequence volumes with report text (sigmoid loss); the detection head is untouched."""
    max_length = model.config.max_text_length

    def collate(rows):
        images, ids, texts, targets = zip(*rows)
        return {"images": torch.stack(images), "sequence_ids": torch.tensor(ids),
                **tokenize(tokenizer, texts, max_length), **stacked_targets(targets)}

    def loss_fn(m: MedMAPModel, batch) -> torch.Tensor:
        ids = batch["sequence_ids"][:, None]
        tokens, _ = m.encode_study(batch["images"][:, None], ids, torch.ones_like(ids, dtype=torch.bool))
        image = m.global_embedding(tokens)
        text = m.encode_text(batch["input_ids"], batch["attention_mask"])
        return sigmoid_loss(image, text, m.t_prime.exp(), m.bias) + _dense(m, tokens, batch)

    model.freeze_text(False)
    # one sequence at a time: the fusion gate has nothing to weigh
    unused = (*HEAD_PARAMS, *SEGMENTER_PARAMS, *CALIBRATION_PARAMS, "sequence_stems.gate", "sequence_stems.gate_bias")
    with _organ_aware(model, samples):
        return train(model, _PairData(samples, model.config.sequences), config, loss_fn=loss_fn, collate_fn=collate,
                     trainable=lambda name: not _under(name, unused) and ".pooler." not in name)


# ---- stage 2: fine-tuning -----------------------------------------------------------------
class _StudyData(Dataset):
    """Study i -> (a random subset of its volumes, their sequence indices, labels), lightly augmented."""

    def __init__(self, samples: Sequence[StudySample], sequences: Sequence[str], full_study_p: float,
                 augment: bool) -> None:
        self.samples, self.sequences = list(samples), tuple(sequences)
        self.full_study_p, self.augment = full_study_p, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        names = list(sample.pixels)
        if len(names) > 1 and float(torch.rand(())) >= self.full_study_p:
            keep = int(torch.randint(1, min(3, len(names)), ()))  # one or two volumes: cheap steps
            names = [names[i] for i in torch.randperm(len(names))[:keep].sort().values.tolist()]
        images = torch.stack([sample.pixels[n].float() for n in names])
        if self.augment:  # per-volume gamma and gain: the scanner-to-scanner contrast spread
            gamma = torch.empty(len(names), 1, 1, 1, 1).uniform_(-0.2, 0.2).exp()
            gain = torch.empty(len(names), 1, 1, 1, 1).uniform_(0.9, 1.1)
            images = (images.clamp(0, 1) ** gamma * gain).clamp(0, 1)
        return images, torch.tensor([self.sequences.index(n) for n in names]), sample.labels, sample.targets


def finetune(model: MedMAPModel, samples: Sequence[StudySample], config: TrainConfig, *, full_study_p: float = 0.25,
             augment: bool = True, pos_weight: float | None = None) -> TrainResult:
    """Multi-label BCE on the class-query logits with the text tower frozen."""

    def loss_fn(m: MedMAPModel, batch) -> torch.Tensor:
        tokens, _ = m.encode_study(batch["images"], batch["sequence_ids"], batch["mask"])
        logits = m.detect_logits(tokens)
        if m.config.evidence:  # the segmenter is fixed: no graph through it
            with torch.no_grad():
                evidence = m.finding_evidence(batch["images"], batch["sequence_ids"], batch["mask"])
            logits = logits + m.calibrated(evidence)
        weight = None if pos_weight is None else torch.full_like(logits[0], pos_weight)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"], pos_weight=weight) + _dense(m, tokens, batch)

    model.freeze_text(True)
    with _organ_aware(model, samples):
        return train(model, _StudyData(samples, model.config.sequences, full_study_p, augment), config,
                     loss_fn=loss_fn, collate_fn=collate_studies,
                     trainable=lambda name: not _under(name, (*TEXT_PARAMS, *ZERO_SHOT_PARAMS, *SEGMENTER_PARAMS)))


# ---- finding evidence -----------------------------------------------------------------------
def train_evidence(model: MedMAPModel, train_set: Sequence[StudySample], held_out: Sequence[StudySample],
                   config: TrainConfig, rounds: int, steps_per_round: int, log=print,
                   crop: Sequence[int] = EVIDENCE_CROP, decay_steps: int = 0) -> list[dict]:
    """The model's segmenter on lesion-centred crops of ``train_set``; continues the run in
    ``config.output_dir``, then takes its copy decayed over ``decay_steps``. Returns the learning
    curve (macro AUC on ``held_out`` whole studies)."""
    sequences = model.config.sequences
    return train_segmenter(model.evidence, segmenter_examples(train_set, sequences),
                           segmenter_examples(held_out, sequences), config, rounds, steps_per_round, log, crop,
                           decay_steps=decay_steps)


@torch.no_grad()
def calibrate(model: MedMAPModel, samples: Sequence[StudySample], steps: int = 300, batch_size: int = 8) -> None:
    """Fits each label's a_l, c_l to the full studies' evidence by logistic regression (BCE)."""
    model.eval()
    evidence = []
    for start in range(0, len(samples), batch_size):
        batch = collate_studies([(torch.stack([s.pixels[n].float() for n in s.pixels]),
                                  model.sequence_ids(list(s.pixels)).cpu(), s.labels, None)
                                 for s in samples[start:start + batch_size]])
        evidence.append(model.finding_evidence(batch["images"], batch["sequence_ids"], batch["mask"]))
    x = torch.logit(torch.cat(evidence), eps=1e-4)
    y = torch.stack([s.labels for s in samples])
    scale, bias = torch.ones(x.shape[1], requires_grad=True), torch.zeros(x.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([scale, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            # a light pull towards (1, 0): a label no training study separates keeps a sane scale
            loss = F.binary_cross_entropy_with_logits(scale * x + bias, y) + 1e-3 * ((scale - 1) ** 2 + bias ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.evidence_scale.copy_(scale)
    model.evidence_bias.copy_(bias)


# ---- evaluation ---------------------------------------------------------------------------
MIN_CALL_AUC = 0.6  # below it a label's validation scores barely rank its studies: F1 would pick a cut near 0
MAX_FALSE_SHARE = 0.5  # a cut that flags more of the validation studies without the label calls noise
MIN_CUT = 0.01  # a finding the detector gives under 1 % is not one it can call


def choose_thresholds(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """Per-label F1-optimal thresholds on validation data; None (the label is not called) where the
    validation studies lack a class, its scores do not separate them (AUC below ``MIN_CALL_AUC``),
    the cut flags more than ``MAX_FALSE_SHARE`` of the studies without it or lies below ``MIN_CUT``.

    On uninformative scores every cut has precision ~ prevalence, so F1 rises with recall and picks a
    low cut: a detector reading one MRI sequence then flagged half its labels. Where a segmenter
    misses a kind, its studies score ~0 with the label or without it, and F1 chose cuts of 0.000:
    a T2 sample's haemorrhage was "found" at p = 0.000 (December 2026).
    """
    aucs = per_class_auc(y, p)
    cuts = [select_threshold(y[:, c], p[:, c], "f1") if aucs[c] >= MIN_CALL_AUC else None for c in range(y.shape[1])]
    return [None if cut is None or cut < MIN_CUT or (p[y[:, c] == 0, c] >= cut).mean() > MAX_FALSE_SHARE else cut
            for c, cut in enumerate(cuts)]


def subset_thresholds(model: MedMAPModel, val: Sequence[StudySample],
                      subsets: dict[str, Sequence[str] | None], zero_shot: bool = False) -> dict[str, list[float]]:
    """Per subset, F1-optimal thresholds on the validation studies that hold its sequences.

    A subset no validation study holds gets no entry: the detector falls back to the study's.
    """
    out = {}
    for key, sequences in subsets.items():
        chosen = with_sequences(val, sequences)
        if chosen:
            y = torch.stack([s.labels for s in chosen]).numpy()
            out[key] = choose_thresholds(y, score_studies(model, chosen, sequences, zero_shot))
    return out


def evaluate(model: MedMAPModel, val: Sequence[StudySample], test: Sequence[StudySample],
             subsets: dict[str, Sequence[str] | None], zero_shot: bool = False) -> dict[str, dict]:
    """Per subset: thresholds chosen on ``val``, then macro AUC / F1 and per-label AUC on ``test``."""
    names = [f"{organ}/{kind}" for organ, kind in model.config.labels]
    thresholds = subset_thresholds(model, val, subsets, zero_shot)
    results = {}
    for key, sequences in subsets.items():
        chosen = with_sequences(test, sequences)
        if key not in thresholds or not chosen:
            continue
        y_test = torch.stack([s.labels for s in chosen]).numpy()
        p = score_studies(model, chosen, sequences, zero_shot)
        aucs = per_class_auc(y_test, p)
        cuts = np.array([np.inf if t is None else t for t in thresholds[key]])  # a label not called is never positive
        results[key] = {"macro_auc": float(np.nanmean(aucs)),
                        "macro_f1": f1_score(y_test, (p >= cuts).astype(int), average="macro"),
                        "thresholds": thresholds[key],
                        "per_label_auc": {n: (None if np.isnan(a) else round(float(a), 4)) for n, a in zip(names, aucs)}}
    return results


# ---- the shipped demo ---------------------------------------------------------------------
def train_medmap_demo(out_dir: str | Path, *, n_train: int = 320, n_val: int = 120, n_test: int = 120,
                      seed: int = 0, input_size: tuple[int, int, int] = (32, 64, 64), phantom_shape=(128, 128, 32),
                      train_findings: Sequence[int] = (2, 3, 4), pretrain_epochs: int = 2, finetune_epochs: int = 4,
                      batch_size: int = 16, evidence: bool = True, segmenter: dict | None = None,
                      work: str | Path | None = None, workers: int = 2, progress: bool = True,
                      command: str | None = None) -> dict:
    """Pre-trains and fine-tunes a small MedMAP detector on fresh MRI phantoms and saves it to ``out_dir``.

    Training studies hold ``train_findings`` findings each (more positives per step); validation
    (thresholds, the segmenter's curve) and test studies keep the phantoms' own 0-2. Zero-shot
    (pre-trained only) and fine-tuned scores are evaluated on the unseen test phantoms, for the full
    study and each sequence alone, and written to ``out_dir/metrics.json``. ``evidence``: with a
    finding segmenter (``segmenter``: rounds, steps_per_round and TrainConfig fields, default
    ``SEGMENTER``). ``work``: a folder that keeps the phantoms and the segmenter's run, so a second
    build continues its rounds (default: a temporary folder).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    temporary = Path(tempfile.mkdtemp(prefix="medmap-runs-"))  # trainer checkpoints stay out of the shipped folder
    work = Path(work) if work is not None else temporary
    work.mkdir(parents=True, exist_ok=True)
    splits = {"train": n_train, "validation": n_val, "test": n_test}
    seeds = {k: [SEED_OFFSETS[k] + seed * 10_000 + i for i in range(n)] for k, n in splits.items()}
    config = MedMAPConfig(PHANTOM_LABELS, input_size=input_size, evidence=evidence, evidence_stride=EVIDENCE_STRIDE)
    data = {k: phantom_samples(s, PHANTOM_LABELS, input_size, shape=phantom_shape, progress=progress,
                               findings=train_findings if k == "train" else None,
                               cache=work / f"phantoms-{k}.pt", workers=workers, stride=config.evidence_stride)
            for k, s in seeds.items()}
    tokenizer = train_tokenizer([s.report for s in data["train"]] + config.prompts, vocab_size=1000)
    torch.manual_seed(seed)
    model = build_model(config, tokenizer)
    common = {"batch_size": batch_size, "seed": seed, "progress": progress, "log_every": 5, "device": "cpu",
              "lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.01}
    extra = {}
    if evidence:
        options = {**SEGMENTER, **(segmenter or {})}
        rounds, steps, decay = options.pop("rounds"), options.pop("steps_per_round"), options.pop("decay_steps", 0)
        run = TrainConfig(output_dir=str(work / "segmenter"), seed=seed, device="cpu", progress=progress,
                          schedule="constant", grad_clip=None, log_every=50, resume=True, **options)
        curve = train_evidence(model, data["train"], data["validation"], run, rounds, steps,
                               print if progress else logger.info, decay_steps=decay)
        test = segmenter_examples(data["test"], model.config.sequences)
        extra = {"segmenter_curve": [{k: row[k] for k in ("steps", "crops", "train_seconds", "cpu_seconds", "decay_from",
                                                          "macro_auc") if k in row} for row in curve],
                 "segmenter_test": segmenter_auc(model.evidence, torch.stack([e["pixels"] for e in test]),
                                                 torch.stack([e["present"] for e in test]))}
    pretrain(model, data["train"], tokenizer,
             TrainConfig(output_dir=str(temporary / "pretrain"), epochs=pretrain_epochs, **common))
    subsets = subsets_of(model.config.sequences)
    zero_shot = evaluate(model, data["validation"], data["test"], subsets, zero_shot=True)
    if evidence:
        calibrate(model, data["train"])
    finetune(model, data["train"], TrainConfig(output_dir=str(temporary / "finetune"), epochs=finetune_epochs,
                                                **common))
    finetuned = evaluate(model, data["validation"], data["test"], subsets)
    shutil.rmtree(temporary, ignore_errors=True)
    thresholds = {key: result["thresholds"] for key, result in finetuned.items()}
    Detector(model.eval(), tokenizer, thresholds, detector_preprocess(input_size)).save(out_dir)
    metrics = {"zero_shot": zero_shot, "finetuned": finetuned, **extra,
               "seeds": {k: [v[0], v[-1]] for k, v in seeds.items()},
               "phantom_shape": list(phantom_shape) if phantom_shape else None,
               "train_findings": list(train_findings), "train_seconds": round(time.perf_counter() - started, 1),
               "cpu_seconds": round(time.process_time() - cpu_started, 1),
               "command": command or f"python -m med3dvlm.train.medmap {out_dir} --seed {seed}"}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def summary(metrics: dict) -> str:
    lines = [f"{'subset':8} {'AUC zero-shot':>14} {'AUC fine-tuned':>15} {'F1 zero-shot':>13} {'F1 fine-tuned':>14}"]
    for key in metrics["finetuned"]:
        z, f = metrics["zero_shot"][key], metrics["finetuned"][key]
        lines.append(f"{key:8} {z['macro_auc']:14.3f} {f['macro_auc']:15.3f} {z['macro_f1']:13.3f} {f['macro_f1']:14.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description="Train the MedMAP demo detector on MRI phantoms.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--evidence", action=argparse.BooleanOptionalAction, default=True,
                        help="with a finding segmenter (default: yes)")
    parser.add_argument("--work", help="keeps the phantoms and the segmenter's run; a second build continues it")
    parser.add_argument("--segmenter-rounds", type=int, default=SEGMENTER["rounds"],
                        help=f"rounds of {SEGMENTER['steps_per_round']} segmenter steps (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m med3dvlm.train.medmap " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics = train_medmap_demo(args.out_dir, seed=args.seed, evidence=args.evidence, work=args.work,
                                segmenter={"rounds": args.segmenter_rounds}, command=command)
    print(summary(metrics))
    print(f"trained in {metrics['train_seconds']} s; detector in {args.out_dir}")


if __name__ == "__main__":
    main()
