"""`med3dvlm train demo --resume MODEL --more-vlm / --realign`: more epochs of a built demo model's last
stage, and a projector aligned afresh on more phantoms.

The demo build's last stage (projector and language model on the tower's tokens) runs one epoch.
Continued for two more at a lower rate (``DemoRecipe.vlm_more``) from the shipped model of
December 2026, on the 100 evaluation phantoms: closed VQA 0.763 -> 0.790, report recall 0.712 ->
0.740, reports with an invented finding 0.25 -> 0.20, projector-token probe 0.957 -> 0.960. This
continues a model folder's last stage on the work folder's phantoms (written if missing): its
tokenizer, image tower and retrieval towers stay as they are, and its recipe.json gains the run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..errors import Med3DVLMError
from ..loading import SIGLIP_FOLDER, load_bundle, save_bundle
from ..models.projector import MixerProjector
from .config import TrainConfig
from .demo import (DemoRecipe, alignment_set, instruction_examples, last_stage, oracle_alignment, read_shards,
                   tower_tokens, write_shards)
from .stages import align_projector


def more_vlm(out_dir: str | Path, work_dir: str | Path, resume: str | Path, recipe: DemoRecipe | None = None,
             progress: bool = True, realign: bool = False, more: bool = True) -> dict:
    """Writes ``resume`` to ``out_dir`` with its projector aligned afresh (``realign``: to the oracle layout,
    on the VLM's phantoms and the recipe's ``alignment_phantoms``, as the build aligns it) and/or with
    ``recipe.vlm_more`` more of its last stage (``more``); returns the run's record."""
    recipe = recipe or DemoRecipe()
    out, work, resume = Path(out_dir), Path(work_dir), Path(resume)
    if out.resolve() == resume.resolve():
        raise Med3DVLMError(f"--out {out} is the model being continued; give a new folder, so the model stays "
                            f"intact if the run stops.")
    started = time.perf_counter()
    model, tokenizer = load_bundle(resume)
    roots = write_shards(work, recipe.n_phantoms, recipe.seed)
    caps, vqas = read_shards(roots)
    _, examples = instruction_examples(roots, caps, vqas, recipe, model.config.num_image_tokens)
    images = sorted({str(c.image_path) for c in caps})
    align_roots, align_images = alignment_set(work, recipe) if realign else ([], [])
    model.vision_tower.eval()
    features = tower_tokens(work, model.vision_tower, images, align_images, recipe, progress)
    record = {"from": resume.name, "projector_realigned_on": len(images) + len(align_images) if realign else None}
    if realign:
        torch.manual_seed(recipe.seed)
        model.mm_projector = MixerProjector(model.config.projector_config)
        clean, alignment = oracle_alignment(model, roots + align_roots, recipe, work / "projector-more", progress)
        aligned = align_projector(model, {k: features[k] for k in images + align_images}, clean, alignment)
        record["projector_alignment_loss"] = [aligned.losses[0], aligned.losses[-1]]
    if more:
        folder = work / "vlm-more"
        shutil.rmtree(folder, ignore_errors=True)   # a stopped run starts over: it is minutes, not hours
        # seed + 1: another batch order than the build's own epoch
        config = TrainConfig(output_dir=str(folder), seed=recipe.seed + 1, progress=progress, **recipe.vlm_more)
        run = last_stage(model, {k: features[k] for k in images}, examples, tokenizer, recipe, config)
        record.update({"options": recipe.vlm_more, "seed": config.seed, "examples": len(examples),
                       "vlm_loss": [run.losses[0], run.losses[-1]]})
    model.eval()
    save_bundle(out, model.cpu(), tokenizer)
    if (resume / SIGLIP_FOLDER).is_dir():
        shutil.copytree(resume / SIGLIP_FOLDER, out / SIGLIP_FOLDER, dirs_exist_ok=True)
    record["seconds"] = round(time.perf_counter() - started, 1)
    built = resume / "recipe.json"
    summary = json.loads(built.read_text()) if built.is_file() else {}
    summary["vlm_more"] = summary.get("vlm_more", []) + [record]
    (out / "recipe.json").write_text(json.dumps(summary, indent=1) + "\n")
    return record
