"""`med3dvlm train demo`: the recipe that builds the bundled demo model from fresh phantoms.

Steps: write CT phantom datasets in the M3D layouts (two shards in parallel, one per core) ->
train a BPE tokenizer on their text -> pre-train a DCFormer-nano image tower on phantoms of its
own (four findings each, made in memory) with the sigmoid loss next to a small BERT text tower
and organ-aware supervision from the phantoms' own masks (``dense``: organ, kind and organ x
kind maps, per-token finding scores) -> the probe gate: a linear probe on the image tokens,
fitted on the VLM's phantoms, must tell organ x kind on phantoms nobody trained on, else the
build stops before the VLM stage -> a VLM whose encoder is that tower (frozen) -> instruction tuning of
projector + LM on reports (each also in a few more wordings, written from its labels) and VQA,
with the image tokens kept centred (see ``vlm_stage``) -> the probe again on the projector's
tokens. The LM is a small Qwen2 trained from scratch, so it is trained fully together with the
projector (a separate projector-only stage needs a pre-trained LM). Output: a model bundle with
its retrieval towers in ``siglip/`` and ``recipe.json`` (the recipe, timings, losses, probes).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config

from ..loading import SIGLIP_FOLDER, save_bundle, save_siglip
from ..data.lesions import PAIRS, Finding
from ..data.m3d import CAP_JSON, CapItem, case_seed, read_cap, read_vqa, write_dataset
from ..errors import Med3DVLMError
from ..eval.probe import probe_auc, token_features
from ..data.reports import write_report
from ..models.dcformer import DCFormerConfig
from ..models.text import TextConfig
from ..preprocess import PRESETS
from ..tokenizer import train_tokenizer
from .config import TrainConfig
from .dense import labels_present, tower_phantoms
from .examples import caption_examples, vqa_examples
from .stages import build_vlm, siglip_stage, vlm_stage
from .volumes import cached_pixels, encoder_features


@dataclass
class DemoRecipe:
    n_phantoms: int = 1000            # the VLM's phantoms (0-2 findings, as a scan comes)
    n_tower_phantoms: int = 1500      # the image tower's phantoms, ``tower_findings`` each
    tower_findings: int = 4
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
    image_token_centering: float = 1.0
    low_output_size: tuple[int, int] = (16, 16)
    high_output_size: tuple[int, int] = (8, 16)
    siglip: dict = field(default_factory=lambda: {"epochs": 18, "batch_size": 16, "lr": 3e-3,
                                                  "weight_decay": 0.05, "warmup_steps": 50})
    vlm: dict = field(default_factory=lambda: {"epochs": 4, "batch_size": 32, "lr": 2e-3,
                                               "weight_decay": 0.0, "warmup_steps": 100})


def _shard(args) -> str:
    root, n, seed = args
    write_dataset(root, n, seed, modality="CT", splits=(1.0, 0.0, 0.0), progress=False)
    return root


def write_shards(work: Path, n: int, seed: int, shards: int = 2) -> list[Path]:
    sizes = [n // shards + (i < n % shards) for i in range(shards)]
    jobs = [(str(work / f"phantoms-{i}"), size, seed * shards + i) for i, size in enumerate(sizes) if size]
    if all(_written(Path(root), size, shard_seed) for root, size, shard_seed in jobs):
        return [Path(root) for root, _, _ in jobs]  # a rerun in the same work folder reuses them
    with ProcessPoolExecutor(len(jobs)) as pool:
        return [Path(root) for root in pool.map(_shard, jobs)]


GATE_SEED = 1_000_000   # + recipe seed: the probe gate's phantoms, apart from training and evaluation
TOWER_SEED = 2_000_000  # + recipe seed: the image tower's phantoms


class ProbeGateFailed(Med3DVLMError):
    """The image tokens do not carry organ x kind well enough to train a language model on them."""


def token_probe(features: dict, fit: list[str], test: list[str], labels: dict, project=None) -> dict:
    """``eval.probe`` on the encoder's two token streams, or on the projector's tokens (``project``)."""
    def stack(keys):
        low, high = (torch.stack([features[k][n] for k in keys]).float() for n in (0, 1))
        with torch.inference_mode():
            streams = (low, high) if project is None else (project(low, high),)
        return token_features(*streams), torch.stack([labels[k] for k in keys])

    return probe_auc(*stack(fit), *stack(test), names=[f"{o}/{k}" for o, k in PAIRS])


@dataclass(frozen=True)
class _CaseFacts:
    """What ``write_report`` reads from a ground truth, rebuilt from a case of labels.json."""

    modality: str
    phase: str | None
    findings: list[Finding]
    organ_labels: dict[str, set[str]]


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
            facts = _CaseFacts(case["modality"], case["phase"],
                               [Finding(**{**f, "center_mm": tuple(f["center_mm"])}) for f in case["findings"]],
                               {organ: set(kinds) for organ, kinds in case["organ_labels"].items()})
            for copy in range(1, copies + 1):
                text = write_report(facts, np.random.default_rng([seed, int(case["seed"]), copy]))
                out += [CapItem(root / image, text) for image in case["images"]]
    return out


def _written(root: Path, n: int, seed: int) -> bool:
    manifest = root / "manifest.json"
    return manifest.is_file() and {k: json.loads(manifest.read_text())[k] for k in ("n", "seed")} == {"n": n, "seed": seed}


def read_shards(roots: list[Path]):
    caps, vqas = [], []
    for root in roots:
        caps += read_cap(root / CAP_JSON, "train")
        vqas += read_vqa(root / "M3D-VQA" / "M3D_VQA_train.csv") + read_vqa(root / "M3D-VQA" / "M3D_VQA_open_train.csv")
    return caps, vqas


def train_demo(out_dir: str | Path, work_dir: str | Path, recipe: DemoRecipe | None = None,
               progress: bool = True) -> dict:
    recipe = recipe or DemoRecipe()
    out, work = Path(out_dir), Path(work_dir)
    torch.manual_seed(recipe.seed)
    timings, started = {}, time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    roots = write_shards(work, recipe.n_phantoms, recipe.seed)
    gate_root = work / "gate-phantoms"
    if not _written(gate_root, recipe.n_gate_phantoms, GATE_SEED + recipe.seed):
        write_dataset(gate_root, recipe.n_gate_phantoms, GATE_SEED + recipe.seed, modality="CT",
                      splits=(1.0, 0.0, 0.0), progress=False)
    caps, vqas = read_shards(roots)
    gate_images = [str(c.image_path) for c in read_cap(gate_root / CAP_JSON, "train")]
    lap("phantoms")
    tokenizer = train_tokenizer([c.text for c in caps] + [f"{q.question} {' '.join(q.choices)} {q.answer}" for q in vqas],
                                vocab_size=recipe.vocab_size)
    pixels = cached_pixels(work / f"pixels-{recipe.preset}.pt", [str(c.image_path) for c in caps] + gate_images,
                           PRESETS[recipe.preset], progress=progress)
    labels = labels_present(roots + [gate_root])
    train_images = sorted({str(c.image_path) for c in caps})
    tower_pixels, tower_pairs, tower_targets = tower_phantoms(
        work / f"tower-{recipe.preset}.pt", [case_seed(TOWER_SEED + recipe.seed, i) for i in range(recipe.n_tower_phantoms)],
        recipe.tower_findings, PRESETS[recipe.preset])
    lap("tokenizer+preprocessing+targets")

    vision = DCFormerConfig.preset("nano", input_size=PRESETS[recipe.preset].shape)
    text = TextConfig(params={"vocab_size": len(tokenizer), "hidden_size": recipe.text_width,
                              "num_hidden_layers": recipe.text_layers, "num_attention_heads": 4,
                              "intermediate_size": 4 * recipe.text_width,
                              "max_position_embeddings": recipe.max_text_length,
                              "pad_token_id": tokenizer.pad_token_id}, pooling="mean")
    siglip, siglip_run = siglip_stage(
        tower_pixels, tower_pairs, tokenizer, vision, text, recipe.embed_dim,
        TrainConfig(output_dir=str(work / "siglip"), seed=recipe.seed, progress=progress, **recipe.siglip),
        max_text_length=recipe.max_text_length, targets=tower_targets)
    lap("siglip+organ-aware")

    features = encoder_features(siglip.vision_encoder, pixels, progress=progress)
    probes = {"encoder_tokens": token_probe(features, train_images, gate_images, labels)}
    lap("probe gate")
    gate = probes["encoder_tokens"]["macro_auc"]
    if progress or gate < recipe.probe_gate:
        print(f"probe gate: organ x kind macro AUC {gate:.3f} on {len(gate_images)} unseen phantoms "
              f"(gate {recipe.probe_gate:.2f})")
    if gate < recipe.probe_gate:
        save_siglip(work / "siglip-failed-gate", siglip, recipe.max_text_length)
        raise ProbeGateFailed(
            f"PROBE GATE FAILED: a linear probe on the image tokens tells organ x kind with macro AUC {gate:.3f} "
            f"on unseen phantoms, below {recipe.probe_gate:.2f}; the language model could not learn what the "
            f"tokens do not carry, so the VLM stage was not started (towers kept in {work / 'siglip-failed-gate'}).")

    lm = Qwen2Config(vocab_size=len(tokenizer), hidden_size=recipe.lm_width, num_hidden_layers=recipe.lm_layers,
                     num_attention_heads=recipe.lm_heads, num_key_value_heads=recipe.lm_kv_heads,
                     intermediate_size=4 * recipe.lm_width, max_position_embeddings=recipe.lm_context,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    model = build_vlm(tokenizer, vision, lm, recipe.preset, prompt_style="exact",
                      low_output_size=recipe.low_output_size, high_output_size=recipe.high_output_size)
    model.vision_tower.load_state_dict(siglip.vision_encoder.state_dict())
    reports = caps + reworded_reports(roots, recipe.report_wordings - 1, recipe.seed)
    examples = caption_examples(reports, model.config.num_image_tokens, recipe.seed) + \
        vqa_examples(vqas, model.config.num_image_tokens)
    vlm_run = vlm_stage(model, {k: features[k] for k in train_images}, examples, tokenizer,
                        TrainConfig(output_dir=str(work / "vlm"), seed=recipe.seed, progress=progress, **recipe.vlm),
                        train_lm=True, max_length=recipe.lm_context, image_token_centering=recipe.image_token_centering)
    lap("vlm")
    model.eval()
    probes["projector_tokens"] = token_probe(features, train_images, gate_images, labels, model.mm_projector)

    save_bundle(out, model, tokenizer)
    save_siglip(out / SIGLIP_FOLDER, siglip, recipe.max_text_length)
    summary = {"recipe": asdict(recipe), "seconds": timings, "examples": len(examples), "probes": probes,
               "siglip_loss": [siglip_run.losses[0], siglip_run.losses[-1]],
               "vlm_loss": [vlm_run.losses[0], vlm_run.losses[-1]],
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "recipe.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
