"""`med3dvlm train demo`: the recipe that builds the bundled demo model from fresh phantoms, through
gates that each prove one thing and stop the build loudly when they fail.

1. Phantoms: CT datasets in the M3D layouts (shards in parallel), and the gate phantoms nobody
   trains on. A BPE tokenizer on their text.
2. The language stage on oracle tokens (``oracle``): a small Qwen2 learns reports and VQA from
   image tokens made of the phantom's truth, for the phantoms and for many more truths drawn
   without volumes (``truths``), first the questions that list what is present, then reports and
   those lists, then everything;
   the language gate scores it on the gate phantoms.
3. The image tower: a DCFormer-nano pre-trained on whole volumes with the sigmoid loss and
   organ-aware maps (``dense``), and a finding segmenter trained on lesion-centred crops
   (``lesion_crops``, scored on the gate phantoms after every round: the learning curve). Joined
   (``evidence_tower``), every deep token carries the organ x kind probabilities of its cell; the
   retrieval towers are fitted again (a fresh text tower); the probe gate asks a linear probe on the tokens.
4. The whole: the projector is aligned to the oracle layout (on the VLM's phantoms and, with
   ``alignment_phantoms``, more of its own), then projector and the language model of step 2 train
   together on the tower's tokens.
Output: a model bundle with its retrieval towers in ``siglip/`` and ``recipe.json`` (the recipe,
gates, learning curve, timings and CPU seconds). ``resume`` starts from a demo model folder: its
tokenizer and towers are kept and its segmenter trains on; the oracle stage and the segmenter
also continue their checkpoints in the same work folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import Qwen2Config

from ..checkpoints import WEIGHTS_NAME
from ..data.lesions import PAIRS
from ..data.m3d import CAP_JSON, CapItem, case_seed, read_cap, read_vqa, write_dataset, written_cases
from ..data.reports import write_report
from ..errors import Med3DVLMError
from ..eval.probe import probe_auc, token_features
from ..loading import SIGLIP_FOLDER, save_bundle, save_siglip
from ..models.dcformer import DCFormerConfig
from ..models.findings import FindingSegmenter
from ..models.text import TextConfig
from ..preprocess import PRESETS
from ..tokenizer import load_tokenizer, train_tokenizer
from .checkpoint import CHECKPOINT_DIR
from .config import TrainConfig
from .dense import labels_present, tower_phantoms
from .evidence_tower import refit_retrieval, towers_without_evidence, with_evidence
from .examples import caption_examples, vqa_examples
from .lesion_crops import segmenter_phantoms, train_segmenter
from .oracle import LanguageGate, case_features, language_gate, oracle_features
from .stages import align_projector, build_vlm, cross_fitted_tokens, siglip_stage, vlm_stage
from .truths import CaseTruth, is_reading, is_report, sample_cases, truth_examples
from .volumes import cached_encoder_features, cached_pixels


@dataclass
class DemoRecipe:
    # The VLM's phantoms (0-2 findings, as a scan comes). The projector fits its training volumes'
    # oracle layouts by their noise: aligned on 1,000, the presence of each organ x kind read from its
    # tokens scores macro AUC 0.999 on them and 0.931 on the 150 gate phantoms (a finding's rank 0.78);
    # on 4,000 (20 epochs), 0.993 and 0.980 (rank 0.90), as good as a linear probe on the encoder's tokens.
    n_phantoms: int = 4000
    n_tower_phantoms: int = 1500      # the DCFormer's whole-volume phantoms, ``tower_findings`` each
    n_segmenter_phantoms: int = 600   # the finding segmenter's phantoms (crops are drawn from them)
    tower_findings: int = 4
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 32))  # phantom processes
    n_gate_phantoms: int = 150        # fresh phantoms the probe gate scores (never trained on)
    probe_gate: float = 0.95          # macro AUC the image tokens must reach before the VLM stage
    seed: int = 0
    preset: str = "demo"
    vocab_size: int = 1200
    embed_dim: int = 128
    text_layers: int = 2
    text_width: int = 128
    max_text_length: int = 256
    lm_width: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_kv_heads: int = 2
    lm_context: int = 640
    report_wordings: int = 3          # reports per training volume: the written one + rewordings
    image_token_centering: float = 0.0   # the oracle layout is not centred: the projector is aligned to it instead
    low_output_size: tuple[int, int] = (16, 16)
    high_output_size: tuple[int, int] = (8, 16)
    siglip: dict = field(default_factory=lambda: {"epochs": 18, "batch_size": 16, "lr": 3e-3,
                                                  "weight_decay": 0.05, "warmup_steps": 50})
    # Constant-rate rounds, then a decayed copy for the tower (``lesion_crops._decayed``).
    segmenter: dict = field(default_factory=lambda: {"rounds": 6, "steps_per_round": 250, "batch_size": 16,
                                                     "lr": 3e-3, "schedule": "constant", "grad_clip": None,
                                                     "log_every": 50, "decay_steps": 750})
    # A fresh text tower (``refit_retrieval``) on the reports and their rewordings: image-to-report R@1 on
    # 150 unseen phantoms 0.26 at lr 3e-3, 0.35 at 1e-3, 0.41 with the rewordings (December 2026).
    # (30 epochs over 1,000 phantoms' reports; 8 over 4,000 are as many steps)
    retrieval: dict = field(default_factory=lambda: {"epochs": 8, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20})
    oracle_truths: int = 20000        # truths without volumes the oracle stage learns from as well
    truth_reports: int = 3            # reports per truth: one is 1 example in 13, too few to learn their grammar
    oracle_reading: dict = field(default_factory=lambda: {"epochs": 1, "max_steps": 800, "batch_size": 32, "lr": 2e-3,
                                                          "weight_decay": 0.0, "warmup_steps": 20})
    oracle_reports: dict = field(default_factory=lambda: {"epochs": 1, "max_steps": 2000, "batch_size": 32, "lr": 2e-3,
                                                          "weight_decay": 0.0, "warmup_steps": 100})
    oracle_report_weight: int = 1     # extra copies of the report and list examples in the whole mixture
    # The whole mixture is ~563,000 examples: 1,500 steps of 32 saw 8.5 % of it, the loss still falling.
    # Continued 3,000 steps (lr 1e-3), the gate on 150 unseen phantoms went closed VQA 0.834 -> 0.894,
    # invented 0.073 -> 0.013, "Where in the ...?" 0.43 -> 0.81, recall 1.000 kept (December 2026).
    # Built at 6,000: 0.887 / 0.007; continued (lr 1e-3) to 9,000: 0.907 / 0.020, to 12,000: 0.921 / 0.013.
    # 9,000 steps are ~1 hour on 2 cores (2.6 steps/s); a checkpoint every 1,000 lets a stopped build resume.
    oracle_vlm: dict = field(default_factory=lambda: {"epochs": 1, "max_steps": 9000, "batch_size": 32, "lr": 2e-3,
                                                      "weight_decay": 0.0, "warmup_steps": 100, "save_every": 1000})
    # At 30 epochs and lr 1e-3 the projector underfit the oracle layout (train and unseen MSE alike 0.005):
    # the oracle-stage LM read its tokens of 60 gate phantoms with report recall 0.10, closed VQA 0.54;
    # at 60 epochs and 3e-3, 0.61 and 0.71 (runs of December 2026). On 4,000 phantoms, 20 epochs: presence
    # on the gate phantoms (see n_phantoms) 0.965 / 0.980 / 0.944 / 0.906 after 10 / 20 / 30 / 60 epochs.
    projector_alignment: dict = field(default_factory=lambda: {"epochs": 20, "batch_size": 32, "lr": 3e-3,
                                                               "warmup_steps": 20})
    # Phantoms beside the VLM's that the projector alone is aligned on (no reports, no LM steps): the
    # alignment needs only a volume's tokens and its truth, and fits what it is given by its noise.
    alignment_phantoms: int = 0
    # > 1: the last stage's LM reads each training volume's tokens from a projector aligned without it
    # (``cross_fitted_tokens``), the projector's errors on unseen volumes, with the projector aligned on
    # all of them kept as it is; 0: projector and LM train together on the projector's own tokens.
    cross_fit_folds: int = 0
    vlm: dict = field(default_factory=lambda: {"epochs": 1, "batch_size": 32, "lr": 5e-4,
                                               "weight_decay": 0.0, "warmup_steps": 30})
    # ``train demo --resume MODEL --more-vlm``: that stage continued on a built model (``vlm_more``)
    vlm_more: dict = field(default_factory=lambda: {"epochs": 2, "batch_size": 32, "lr": 3e-4,
                                                    "weight_decay": 0.0, "warmup_steps": 30})
    language_gate: LanguageGate = field(default_factory=LanguageGate)

    @classmethod
    def from_file(cls, path: str | Path) -> DemoRecipe:
        """The recipe with the fields a JSON file gives changed (a stage's options are replaced whole)."""
        try:
            changes = json.loads(Path(path).read_text())
            if "language_gate" in changes:
                changes["language_gate"] = LanguageGate(**changes["language_gate"])
            return cls(**changes)
        except (OSError, ValueError, TypeError) as error:
            raise Med3DVLMError(f"The recipe file {path} cannot be used ({error}); give a JSON object of "
                                f"DemoRecipe fields.") from None


def _shard(args) -> str:
    root, n, seed = args
    write_dataset(root, n, seed, modality="CT", splits=(1.0, 0.0, 0.0), progress=False)
    return root


def write_shards(work: Path, n: int, seed: int, shards: int = 2, name: str = "phantoms", base: int = 0) -> list[Path]:
    """``n`` VLM phantoms in ``shards`` folders ``work/name-i``, written in parallel; shard i's seed is
    ``base + seed * shards + i``."""
    sizes = [n // shards + (i < n % shards) for i in range(shards)]
    jobs = [(str(work / f"{name}-{i}"), size, base + seed * shards + i) for i, size in enumerate(sizes) if size]
    if all(written_cases(root, shard_seed) == size for root, size, shard_seed in jobs):
        return [Path(root) for root, _, _ in jobs]  # a rerun in the same work folder reuses them
    with ProcessPoolExecutor(len(jobs)) as pool:
        return [Path(root) for root in pool.map(_shard, jobs)]


GATE_SEED = 1_000_000   # + recipe seed: the probe gate's phantoms, apart from training and evaluation
TOWER_SEED = 2_000_000  # + recipe seed: the image tower's phantoms
TRUTH_SEED = 3_000_000  # + recipe seed: the truths without volumes of the oracle stage
ALIGN_SEED = 4_000_000  # + recipe seed x 2: the phantoms the projector alone is aligned on


class ProbeGateFailed(Med3DVLMError):
    """The image tokens do not carry organ x kind well enough to train a language model on them."""


def token_probe(features: dict, fit: list[str], test: list[str], labels: dict, project=None) -> dict:
    """``eval.probe`` on the encoder's two token streams, or on the projector's tokens (``project``)."""
    def stack(keys):
        low, high = (torch.stack([features[k][n] for k in keys]).float() for n in (0, 1))
        with torch.inference_mode():
            device = next(project.parameters()).device if project is not None else None
            streams = (low, high) if project is None else (project(low.to(device), high.to(device)).cpu(),)
        return token_features(*streams), torch.stack([labels[k] for k in keys])

    return probe_auc(*stack(fit), *stack(test), names=[f"{o}/{k}" for o, k in PAIRS])


def reworded_reports(roots: list[Path], copies: int, seed: int) -> list[CapItem]:
    """``copies`` more reports per training volume: same facts, other wordings and orders.

    A small LM trained from scratch sees each of the 1,000 reports only a few times; more
    wordings teach it the report language without teaching it any fact the image does not show.
    """
    out = []
    for root in roots:
        for case in json.loads((root / "labels.json").read_text())["cases"]:
            if case["split"] != "train":
                continue
            facts = CaseTruth.from_case(case)
            for copy in range(1, copies + 1):
                text = write_report(facts, np.random.default_rng([seed, int(case["seed"]), copy]))
                out += [CapItem(root / image, text) for image in case["images"]]
    return out


def read_shards(roots: list[Path]):
    caps, vqas = [], []
    for root in roots:
        caps += read_cap(root / CAP_JSON, "train")
        vqas += read_vqa(root / "M3D-VQA" / "M3D_VQA_train.csv") + read_vqa(root / "M3D-VQA" / "M3D_VQA_open_train.csv")
    return caps, vqas


def train_demo(out_dir: str | Path, work_dir: str | Path, recipe: DemoRecipe | None = None,
               progress: bool = True, resume: str | Path | None = None) -> dict:
    """Builds the demo model; ``resume`` (a demo model folder, e.g. the shipped one) keeps its
    tokenizer and retrieval towers and continues its finding segmenter instead of starting over."""
    recipe = recipe or DemoRecipe()
    out, work = Path(out_dir), Path(work_dir)
    torch.manual_seed(recipe.seed)
    timings, started = {}, time.perf_counter()
    log = print if progress else (lambda *_: None)

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    roots = write_shards(work, recipe.n_phantoms, recipe.seed)
    gate_root = work / "gate-phantoms"
    if written_cases(gate_root, GATE_SEED + recipe.seed) != recipe.n_gate_phantoms:
        write_dataset(gate_root, recipe.n_gate_phantoms, GATE_SEED + recipe.seed, modality="CT",
                      splits=(1.0, 0.0, 0.0), progress=False)
    caps, vqas = read_shards(roots)
    gate_caps = read_cap(gate_root / CAP_JSON, "train")
    gate_images = [str(c.image_path) for c in gate_caps]
    lap("phantoms")

    # 1. The language stage, proven on oracle tokens before any tower is trusted.
    tokenizer = load_tokenizer(resume) if resume else train_tokenizer(
        [c.text for c in caps] + [f"{q.question} {' '.join(q.choices)} {q.answer}" for q in vqas],
        vocab_size=recipe.vocab_size)
    vision = DCFormerConfig.preset("nano", input_size=PRESETS[recipe.preset].shape)
    model = build_vlm(tokenizer, dataclasses.replace(vision, evidence=True), _language_model(recipe, tokenizer),
                      recipe.preset, prompt_style="exact", low_output_size=recipe.low_output_size,
                      high_output_size=recipe.high_output_size)
    reports, examples = instruction_examples(roots, caps, vqas, recipe, model.config.num_image_tokens)
    oracle = oracle_features(roots + [gate_root], model.config.num_image_tokens, recipe.lm_width,
                             recipe.language_gate.noise, recipe.seed)
    truths = {f"truth:{i}": case for i, case in enumerate(sample_cases(recipe.oracle_truths, TRUTH_SEED + recipe.seed))}
    oracle.update(case_features(truths, model.config.num_image_tokens, recipe.lm_width, recipe.language_gate.noise,
                                recipe.seed))
    rng = np.random.default_rng(TRUTH_SEED + recipe.seed)
    truth_rows = [row for key, case in truths.items()
                  for row in truth_examples(key, case, model.config.num_image_tokens, rng, reports=recipe.truth_reports)]
    # First what is present (one query, whatever the question), then reports with those lists, then
    # everything with reports and lists weighted up: from scratch, the LM learns to read the tokens on
    # the lists, then to write them into reports, and only then questions about one fact. In the
    # whole mixture at once, reports (one example in seven) never learnt to state what the tokens hold.
    reading = [row for row in truth_rows if is_reading(row)]
    reporting = [row for row in examples + truth_rows if is_report(row) or is_reading(row)]
    reading_run = _resumable_vlm_stage(model, oracle, reading, tokenizer, recipe, work / "oracle-reading", progress,
                                       recipe.oracle_reading)
    reports_run = _resumable_vlm_stage(model, oracle, reporting, tokenizer, recipe, work / "oracle-reports", progress,
                                       recipe.oracle_reports)
    oracle_run = _resumable_vlm_stage(model, oracle, examples + truth_rows + reporting * recipe.oracle_report_weight,
                                      tokenizer, recipe, work / "oracle", progress, recipe.oracle_vlm)
    language = language_gate(model, tokenizer, oracle, gate_root, recipe.language_gate)
    log(f"language gate: recall {language['report_recall']:.3f}, invented {language['reports_with_invented_finding']:.3f}, "
        f"closed VQA {language['closed_vqa_accuracy']:.3f} on {language['n_volumes']} unseen phantoms from oracle tokens")
    lap("language stage on oracle tokens")

    # 2. The image tower: a DCFormer (whole volumes, sigmoid loss + organ-aware maps) and a finding
    #    segmenter (lesion-centred crops), joined so that each deep token carries organ x kind evidence.
    align_roots, align_images = alignment_set(work, recipe)
    labels = labels_present(roots + [gate_root])
    train_images = sorted({str(c.image_path) for c in caps})
    lap("alignment phantoms")
    if resume:
        siglip = towers_without_evidence(Path(resume) / SIGLIP_FOLDER)
    else:
        siglip = _dcformer_stage(recipe, work, tokenizer, vision, progress)
    lap("dcformer")
    segmenter, curve = _segmenter_stage(recipe, work, resume, progress, log)
    lap("finding segmenter")
    siglip = with_evidence(siglip, segmenter).to(next(segmenter.parameters()).device)
    features = tower_tokens(work, siglip.vision_encoder, [str(c.image_path) for c in caps] + gate_images,
                            align_images, recipe, progress)
    refit_retrieval(siglip, {k: f[1].float().mean(0) for k, f in features.items()},
                    [(str(c.image_path), c.text) for c in reports], tokenizer,
                    _train_config(recipe, work / "retrieval", progress, recipe.retrieval))
    probes = {"encoder_tokens": token_probe(features, train_images, gate_images, labels)}
    gate = probes["encoder_tokens"]["macro_auc"]
    log(f"probe gate: organ x kind macro AUC {gate:.3f} on {len(gate_images)} unseen phantoms "
        f"(gate {recipe.probe_gate:.2f})")
    lap("tower tokens (preprocessing, encoding), retrieval, probe gate")
    if gate < recipe.probe_gate:
        save_siglip(work / "siglip-failed-gate", siglip, recipe.max_text_length)
        raise ProbeGateFailed(
            f"PROBE GATE FAILED: a linear probe on the image tokens tells organ x kind with macro AUC {gate:.3f} "
            f"on unseen phantoms, below {recipe.probe_gate:.2f}; the language model could not learn what the "
            f"tokens do not carry, so the VLM stage was not started (towers kept in {work / 'siglip-failed-gate'}; "
            f"train the segmenter longer with --resume).")

    # 3. The whole: the projector learns to give the oracle's layout from the tower's tokens, then
    #    the language model of step 1 learns on them (with the projector, or cross-fitted: see the recipe).
    model.vision_tower.load_state_dict(siglip.vision_encoder.state_dict())
    clean, alignment = oracle_alignment(model, roots + align_roots, recipe, work / "projector", progress)
    train_features = {k: features[k] for k in train_images}
    if recipe.cross_fit_folds > 1:
        train_features = cross_fitted_tokens(model, train_features, clean, alignment, recipe.cross_fit_folds)
    align_run = align_projector(model, {k: features[k] for k in train_images + align_images}, clean, alignment)
    lap("projector alignment")
    vlm_run = last_stage(model, train_features, examples, tokenizer, recipe,
                         _train_config(recipe, work / "vlm", progress, recipe.vlm))
    lap("vlm")
    model.eval()
    probes["projector_tokens"] = token_probe(features, train_images, gate_images, labels, model.mm_projector)
    model, siglip = model.cpu(), siglip.cpu()  # trained on a GPU where there is one; saved from the CPU

    save_bundle(out, model, tokenizer)
    save_siglip(out / SIGLIP_FOLDER, siglip, recipe.max_text_length)
    summary = {"recipe": asdict(recipe), "seconds": timings, "cpu_seconds": _cpu_seconds(),
               # the folder's name, not this machine's path: the record ships with the model
               "resumed_from": Path(resume).name if resume else None, "examples": len(examples),
               "language_gate": language, "probes": probes, "segmenter_curve": curve,
               "oracle_reading_loss": [reading_run.losses[0], reading_run.losses[-1]],
               "oracle_reports_loss": [reports_run.losses[0], reports_run.losses[-1]],
               "oracle_loss": [oracle_run.losses[0], oracle_run.losses[-1]],
               "projector_alignment_loss": [align_run.losses[0], align_run.losses[-1]],
               "vlm_loss": [vlm_run.losses[0], vlm_run.losses[-1]],
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "recipe.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def alignment_set(work: Path, recipe: DemoRecipe) -> tuple[list[Path], list[str]]:
    """The phantoms the projector alone is aligned on (``DemoRecipe.alignment_phantoms``), written if
    missing: their folders and image paths."""
    if not recipe.alignment_phantoms:
        return [], []
    roots = write_shards(work, recipe.alignment_phantoms, recipe.seed, name="align-phantoms", base=ALIGN_SEED)
    return roots, [str(c.image_path) for root in roots for c in read_cap(root / CAP_JSON, "train")]


def tower_tokens(work: Path, encoder, images: list[str], align_images: list[str], recipe: DemoRecipe,
                 progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The encoder's (low, high) tokens of the VLM's (and gate's) volumes and of the alignment phantoms',
    through the work folder's caches; a pixel cache is loaded (or its volumes preprocessed) only if one of
    its volumes lacks its tokens."""
    def pixels(missing: list[str]) -> dict[str, torch.Tensor]:
        loaded, wanted = {}, set(missing)
        for cache, paths in (("pixels", images), ("pixels-align", align_images)):
            if wanted.intersection(paths):
                loaded.update(cached_pixels(work / f"{cache}-{recipe.preset}.pt", paths, PRESETS[recipe.preset],
                                            progress=progress))
        return loaded

    return cached_encoder_features(work, encoder, images + align_images, pixels, progress=progress)


def oracle_alignment(model, roots: list[Path], recipe: DemoRecipe, folder: Path,
                     progress: bool) -> tuple[dict[str, torch.Tensor], TrainConfig]:
    """What ``align_projector`` aligns the projector to (the noise-free oracle layout of ``roots``' volumes),
    and how (``DemoRecipe.projector_alignment``, checkpoints in ``folder``)."""
    clean = oracle_features(roots, model.config.num_image_tokens, model.config.text_config.hidden_size, 0.0, recipe.seed)
    return clean, _train_config(recipe, folder, progress, recipe.projector_alignment)


def instruction_examples(roots: list[Path], caps: list[CapItem], vqas: list, recipe: DemoRecipe,
                         num_image_tokens: int) -> tuple[list[CapItem], list]:
    """The reports (each training volume's written one and its rewordings) and the examples of the
    language stages: those reports, and the shards' closed and open questions."""
    reports = caps + reworded_reports(roots, recipe.report_wordings - 1, recipe.seed)
    return reports, caption_examples(reports, num_image_tokens, recipe.seed) + vqa_examples(vqas, num_image_tokens)


def last_stage(model, features: dict, examples: list, tokenizer, recipe: DemoRecipe, config: TrainConfig):
    """The build's last stage: projector and language model together on the tower's (cached) tokens,
    or the language model alone on image tokens (``cross_fitted_tokens``)."""
    return vlm_stage(model, features, examples, tokenizer, config, train_lm=True, max_length=recipe.lm_context,
                     image_token_centering=recipe.image_token_centering)


def _language_model(recipe: DemoRecipe, tokenizer) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=recipe.lm_width, num_hidden_layers=recipe.lm_layers,
                       num_attention_heads=recipe.lm_heads, num_key_value_heads=recipe.lm_kv_heads,
                       intermediate_size=4 * recipe.lm_width, max_position_embeddings=recipe.lm_context,
                       tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _resumable_vlm_stage(model, features: dict, examples: list, tokenizer, recipe: DemoRecipe, folder: Path,
                        progress: bool, options: dict):
    """An LM stage on oracle tokens; its inputs are the phantoms and the recipe alone, so a rerun in the
    same work folder continues it."""
    config = _train_config(recipe, folder, progress, options)
    config.resume = (folder / CHECKPOINT_DIR / "training_state.pt").is_file()
    return vlm_stage(model, features, examples, tokenizer, config, train_lm=True, max_length=recipe.lm_context)


def _train_config(recipe: DemoRecipe, folder: Path, progress: bool, options: dict) -> TrainConfig:
    return TrainConfig(output_dir=str(folder), seed=recipe.seed, progress=progress, **options)


def _dcformer_stage(recipe: DemoRecipe, work: Path, tokenizer, vision: DCFormerConfig, progress: bool):
    """SigLIP + organ-aware pre-training of the DCFormer on whole tower phantoms (``dense``)."""
    tower_pixels, tower_pairs, tower_targets = tower_phantoms(
        work / f"tower-{recipe.preset}.pt", [case_seed(TOWER_SEED + recipe.seed, i) for i in range(recipe.n_tower_phantoms)],
        recipe.tower_findings, PRESETS[recipe.preset], workers=recipe.workers)
    text = TextConfig(params={"vocab_size": len(tokenizer), "hidden_size": recipe.text_width,
                              "num_hidden_layers": recipe.text_layers, "num_attention_heads": 4,
                              "intermediate_size": 4 * recipe.text_width,
                              "max_position_embeddings": recipe.max_text_length,
                              "pad_token_id": tokenizer.pad_token_id}, pooling="mean")
    siglip, _ = siglip_stage(tower_pixels, tower_pairs, tokenizer, vision, text, recipe.embed_dim,
                             _train_config(recipe, work / "siglip", progress, recipe.siglip),
                             max_text_length=recipe.max_text_length, targets=tower_targets)
    return siglip


def _segmenter_stage(recipe: DemoRecipe, work: Path, resume, progress: bool, log) -> tuple[FindingSegmenter, list]:
    """The finding segmenter on lesion-centred crops; continues the work folder's run, or starts
    from ``resume``'s weights."""
    config = PRESETS[recipe.preset]
    options = dict(recipe.segmenter)
    rounds, steps, decay = options.pop("rounds"), options.pop("steps_per_round"), options.pop("decay_steps", 0)
    examples = held_out = []
    if rounds or decay:  # a build that trains no segmenter step renders none of its phantoms
        examples = segmenter_phantoms(work / f"segmenter-phantoms-{recipe.preset}.pt",
                                      [case_seed(TOWER_SEED + recipe.seed, i) for i in range(recipe.n_segmenter_phantoms)],
                                      recipe.tower_findings, config, recipe.workers)
        held_out = segmenter_phantoms(work / f"segmenter-heldout-{recipe.preset}.pt",
                                      [case_seed(GATE_SEED + recipe.seed, i) for i in range(recipe.n_gate_phantoms)],
                                      None, config, recipe.workers)
    segmenter = FindingSegmenter()
    folder = work / "segmenter"
    # Until the run has a checkpoint of its own (a build stopped before its first round has the
    # curve alone), it starts from the resumed model's weights: those of its retrieval towers, which a
    # bundle may carry from a later build than its VLM's (their record is then siglip/recipe.json).
    if resume and not (folder / CHECKPOINT_DIR).is_dir():
        towers = Path(resume) / SIGLIP_FOLDER
        shipped = _stored(towers / WEIGHTS_NAME, "vision_encoder.evidence.")
        if shipped:
            segmenter.load_state_dict(shipped)
            if not (folder / "curve.json").is_file():
                record = towers / "recipe.json" if (towers / "recipe.json").is_file() else Path(resume) / "recipe.json"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "curve.json").write_text(json.dumps(json.loads(record.read_text())["segmenter_curve"],
                                                              indent=1) + "\n")
    curve = train_segmenter(segmenter, examples, held_out,
                            _train_config(recipe, folder, progress, {**options, "resume": True}),
                            rounds, steps, log, decay_steps=decay)
    return segmenter.eval(), curve


def _cpu_seconds() -> float:
    """CPU time of this process and of the phantom workers it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)


def _stored(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file under ``prefix``, with the prefix removed."""
    with safe_open(str(path), "pt") as stored:
        return {k[len(prefix):]: stored.get_tensor(k) for k in stored.keys() if k.startswith(prefix)}
