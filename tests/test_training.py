"""Training on freshly generated phantoms: the demo recipe in miniature and the stage commands."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import med3dvlm
from med3dvlm.cli import main
from med3dvlm.models.dcformer import DCFormer, DCFormerConfig
from med3dvlm.preprocess import DEMO, preprocess
from med3dvlm.readers import read_volume
from med3dvlm.train.demo import DemoRecipe, train_demo
from med3dvlm.train.oracle import LanguageGate
from med3dvlm.train.vlm_more import more_vlm
from med3dvlm.train.volumes import cached_encoder_features, cached_pixels, encoder_features

ROOT = Path(__file__).resolve().parents[1]
OPEN_GATE = LanguageGate(recall=0.0, invented=1.0, closed_vqa=0.0, n_phantoms=4)


def tiny_recipe(**changes) -> DemoRecipe:
    """The demo recipe in miniature: every stage runs, in seconds; gates open unless changed."""
    options = dict(n_phantoms=12, n_tower_phantoms=10, n_segmenter_phantoms=4, n_gate_phantoms=6, probe_gate=0.0,
                   seed=3, lm_layers=2, lm_width=64, lm_heads=2, workers=2, language_gate=OPEN_GATE,
                   siglip={"epochs": 3, "batch_size": 6, "lr": 1e-3},
                   segmenter={"rounds": 1, "steps_per_round": 3, "batch_size": 4, "lr": 3e-3},
                   retrieval={"epochs": 2, "batch_size": 8, "lr": 1e-3},
                   oracle_truths=40, oracle_reading={"epochs": 1, "batch_size": 16},
                   oracle_reports={"epochs": 1, "batch_size": 16}, oracle_vlm={"epochs": 3, "batch_size": 16, "lr": 3e-3},
                   projector_alignment={"epochs": 2, "batch_size": 8, "lr": 1e-3},
                   vlm={"epochs": 2, "batch_size": 16, "lr": 3e-3})
    return DemoRecipe(**{**options, **changes})


def test_gpu_script_dry_run_builds_a_loadable_demo_and_python_resumes_it(tmp_path, capsys):
    """scripts/train_demo_gpu.sh with a tiny recipe on the CPU (the GPU run is the same command)."""
    recipe = {k: v for k, v in dataclasses.asdict(tiny_recipe()).items() if k != "workers"}
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))
    env = {**os.environ, "MED3DVLM_DEMO_RECIPE": str(tmp_path / "tiny.json"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_demo_gpu.sh"), str(tmp_path / "model"),
                           str(tmp_path / "work")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Demo model written to" in done.stdout and "language gate on oracle tokens" in done.stdout
    summary = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert summary["oracle_loss"][1] < 0.8 * summary["oracle_loss"][0]
    assert summary["oracle_reports_loss"][1] < summary["oracle_reports_loss"][0]
    assert set(summary["language_gate"]) >= {"report_recall", "closed_vqa_accuracy", "reports_with_invented_finding"}
    assert [row["steps"] for row in summary["segmenter_curve"]] == [3]
    assert summary["cpu_seconds"] > 0
    pipe = med3dvlm.load(tmp_path / "model", device="cpu")
    assert pipe.retrieval is not None and pipe.model.config.vision_config.evidence
    image = next((tmp_path / "work" / "phantoms-0" / "M3D_Cap_npy" / "ct_case" / "000001").glob("*.nii.gz"))
    assert isinstance(pipe.report(image, max_new_tokens=8), str)
    assert summary["recipe"]["n_phantoms"] == 12
    assert set(summary["probes"]) == {"encoder_tokens", "projector_tokens"}

    # --more-vlm: only the last stage goes on; tower and retrieval towers stay, the record grows
    assert main(["train", "demo", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--resume",
                 str(tmp_path / "model"), "--more-vlm"]) == 2   # never over the model it continues
    assert main(["train", "demo", "--out", str(tmp_path / "x"), "--more-vlm"]) == 2   # and only a built one
    assert "name it with --resume" in capsys.readouterr().err
    # (--realign: a fresh projector first, aligned on the VLM's 12 phantoms and 4 of its own)
    record = more_vlm(tmp_path / "model-more", tmp_path / "work", tmp_path / "model",
                      tiny_recipe(vlm_more={"epochs": 1, "batch_size": 16, "lr": 1e-3}, alignment_phantoms=4),
                      progress=False, realign=True)
    before, after = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("model", "model-more"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_tower."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    assert record["projector_realigned_on"] == 16 and len(list((tmp_path / "work").glob("align-phantoms-*"))) == 2
    # --realign alone: a new projector, the language model as it was
    (tmp_path / "align.json").write_text(json.dumps({**recipe, "alignment_phantoms": 4}))
    assert main(["train", "demo", "--out", str(tmp_path / "model-aligned"), "--work", str(tmp_path / "work"), "--resume",
                 str(tmp_path / "model"), "--realign", "--recipe", str(tmp_path / "align.json")]) == 0
    assert "a projector aligned afresh on 16 phantoms" in capsys.readouterr().out
    aligned = load_file(str(tmp_path / "model-aligned" / "model.safetensors"))
    assert all(torch.equal(before[k], aligned[k]) for k in before if not k.startswith("mm_projector."))
    assert not all(torch.equal(before[k], aligned[k]) for k in before if k.startswith("mm_projector."))
    assert json.loads((tmp_path / "model-more" / "recipe.json").read_text())["vlm_more"] == [record]
    assert med3dvlm.load(tmp_path / "model-more", device="cpu").retrieval is not None

    # --resume from the written model in a new work folder: its segmenter goes on, its curve with it;
    # this build's last stage reads cross-fitted tokens: one projector per fold, then one on all
    again = train_demo(tmp_path / "model-2", tmp_path / "work-2", tiny_recipe(cross_fit_folds=2), progress=False,
                       resume=tmp_path / "model")
    assert [row["steps"] for row in again["segmenter_curve"]] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "work-2" / "projector").glob("fold-*")) == ["fold-0", "fold-1"]
    assert again["resumed_from"] == "model"
    assert (tmp_path / "model-2" / "tokenizer.json").read_text() == (tmp_path / "model" / "tokenizer.json").read_text()

    # a build stopped after the curve was copied but before a round: the rerun starts from the model's segmenter
    (tmp_path / "work-3" / "segmenter").mkdir(parents=True)
    shutil.copy(tmp_path / "work-2" / "segmenter" / "curve.json", tmp_path / "work-3" / "segmenter")
    train_demo(tmp_path / "model-3", tmp_path / "work-3", tiny_recipe(segmenter={**tiny_recipe().segmenter, "rounds": 0}),
               progress=False, resume=tmp_path / "model-2")
    shipped, rebuilt = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("model-2", "model-3"))
    evidence = [k for k in shipped if k.startswith("vision_tower.evidence.")]
    assert evidence and all(torch.equal(shipped[k], rebuilt[k]) for k in evidence)
    assert not list((tmp_path / "work-3").glob("segmenter-*.pt"))  # no step asked: none of its phantoms rendered


def test_pixel_cache_survives_a_moved_work_folder_and_fills_only_what_it_lacks(ct_dataset, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "phantoms").symlink_to(ct_dataset)
    images = sorted(str(p) for p in (work / "phantoms").rglob("*.nii.gz"))
    cache = work / "pixels-demo.pt"
    first = cached_pixels(cache, images[:3], DEMO, progress=False)
    assert first[images[0]].dtype == torch.float16
    assert torch.equal(first[images[0]].float(), preprocess(read_volume(images[0]), DEMO).half().float())
    moved = tmp_path / "renamed"
    work.rename(moved)
    stamp = (moved / "pixels-demo.pt").stat().st_mtime_ns
    again = cached_pixels(moved / "pixels-demo.pt", [p.replace(str(work), str(moved)) for p in images[:3]], DEMO,
                          progress=False)
    assert (moved / "pixels-demo.pt").stat().st_mtime_ns == stamp  # served from the cache, not recomputed
    assert torch.equal(again[images[1].replace(str(work), str(moved))], first[images[1]])
    grown = cached_pixels(moved / "pixels-demo.pt", [p.replace(str(work), str(moved)) for p in images[:5]], DEMO,
                          progress=False)
    assert len(grown) == 5 and len(torch.load(moved / "pixels-demo.pt", weights_only=True)) == 5


def test_encoder_features_are_cached_per_encoder_weights(tmp_path):
    torch.manual_seed(0)
    encoder = DCFormer(DCFormerConfig.preset("nano", input_size=(16, 32, 32))).eval()
    pixels = {str(tmp_path / f"v{i}.nii.gz"): torch.randn(1, 16, 32, 32).half() for i in range(3)}
    loads = []

    def load(missing):
        loads.append(sorted(missing))
        return pixels

    first = cached_encoder_features(tmp_path, encoder, list(pixels), load, progress=False)
    direct = encoder_features(encoder, pixels, progress=False)
    assert all(torch.equal(first[k][j], direct[k][j]) for k in pixels for j in (0, 1)) and loads == [sorted(pixels)]
    [cache] = tmp_path.glob("features-*.pt")
    stamp = cache.stat().st_mtime_ns
    again = cached_encoder_features(tmp_path, encoder, list(pixels), load, progress=False)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again[next(iter(pixels))][1], direct[next(iter(pixels))][1])
    assert len(loads) == 1  # every feature cached: the volumes are not loaded at all
    with torch.no_grad():  # another tower (a segmenter trained on): its own features, the old file gone
        next(encoder.parameters()).add_(1.0)
    changed = cached_encoder_features(tmp_path, encoder, list(pixels), load, progress=False)
    [replaced] = tmp_path.glob("features-*.pt")
    assert replaced != cache and not torch.equal(changed[next(iter(pixels))][1], direct[next(iter(pixels))][1])


def test_stage_commands_chain_siglip_projector_instruct(ct_dataset, tmp_path, capsys):
    siglip, projector, instruct = (str(tmp_path / name) for name in ("siglip", "projector", "instruct"))
    common = ["max_steps=2", "batch_size=4", "progress=false"]
    assert main(["train", "siglip", "--data", str(ct_dataset), "--out", siglip, "--embed-dim", "32", *common]) == 0
    assert main(["train", "projector", "--data", str(ct_dataset), "--siglip", siglip, "--out", projector, *common]) == 0
    assert main(["train", "instruct", "--data", str(ct_dataset), "--model", projector, "--out", instruct,
                 "--lora-rank", "4", *common]) == 0
    run = json.loads((tmp_path / "instruct" / "run" / "run_config.json").read_text())
    assert run["max_steps"] == 2
    pipe = med3dvlm.load(instruct, device="cpu")
    assert pipe.retrieval is not None and pipe.num_image_tokens > 0
    assert "lora" not in " ".join(name for name, _ in pipe.model.named_parameters())  # merged back


def test_bad_dataset_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "siglip", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not an M3D-layout dataset" in capsys.readouterr().err


def test_demo_build_stops_loudly_at_the_probe_gate(tmp_path):
    """A gate no tower can pass: the build says so before the VLM stage and writes no model."""
    from med3dvlm.train.demo import ProbeGateFailed

    recipe = tiny_recipe(n_phantoms=8, n_tower_phantoms=6, probe_gate=1.01, seed=4,
                         siglip={"epochs": 1, "batch_size": 6, "lr": 1e-3}, oracle_vlm={"epochs": 1, "batch_size": 16})
    with pytest.raises(ProbeGateFailed, match="PROBE GATE FAILED.*VLM stage was not started"):
        train_demo(tmp_path / "model", tmp_path / "work", recipe, progress=False)
    assert not (tmp_path / "model").exists()
    assert (tmp_path / "work" / "siglip-failed-gate").is_dir()
    assert not (tmp_path / "work" / "vlm").exists()


def test_demo_build_stops_at_the_language_gate_before_any_tower_is_trained(tmp_path):
    from med3dvlm.train.oracle import LanguageGateFailed

    recipe = tiny_recipe(n_phantoms=8, seed=4, oracle_vlm={"epochs": 1, "batch_size": 16},
                         language_gate=LanguageGate(recall=1.01, n_phantoms=4))
    with pytest.raises(LanguageGateFailed, match="LANGUAGE GATE FAILED"):
        train_demo(tmp_path / "model", tmp_path / "work", recipe, progress=False)
    assert not (tmp_path / "model").exists()
    assert not (tmp_path / "work" / "segmenter").exists() and not (tmp_path / "work" / "siglip").exists()


def test_resume_from_a_folder_without_demo_towers_says_so():
    from med3dvlm.errors import Med3DVLMError
    from med3dvlm.train.evidence_tower import towers_without_evidence

    with pytest.raises(Med3DVLMError, match="resume from a folder written by med3dvlm train demo"):
        towers_without_evidence(ROOT / "resources" / "models" / "demo")     # the VLM's folder, not its siglip/
    assert towers_without_evidence(ROOT / "resources" / "models" / "demo" / "siglip").max_text_length > 0


def test_retrieval_refit_learns_reports_from_features_of_any_scale(tmp_path):
    """The refit's fresh text tower and standardised image features: reports of six findings are told
    apart by image features whose informative channels are 10,000 times smaller than the rest, and
    the saved towers take the raw features (the standardisation is folded into the projection)."""
    from transformers import AutoTokenizer

    from med3dvlm.loading import load_siglip
    from med3dvlm.train.config import TrainConfig
    from med3dvlm.train.evidence_tower import refit_retrieval

    demo = ROOT / "resources" / "models" / "demo"
    siglip, tokenizer = load_siglip(demo / "siglip"), AutoTokenizer.from_pretrained(str(demo))
    texts = ["There is a cyst in the liver.", "There is a mass in the spleen.", "The left kidney holds a calcification.",
             "Right pleural effusion.", "There is haemorrhage in the right kidney.", "The liver is unremarkable."]
    width, generator = siglip.mm_vision_proj.in_features, torch.Generator().manual_seed(0)
    pattern = torch.randn(len(texts), 16, generator=generator)

    def features(label: int) -> torch.Tensor:
        noise = 100 * torch.randn(width - 16, generator=generator)
        return torch.cat([noise, 0.01 * pattern[label] + 0.001 * torch.randn(16, generator=generator)])

    pooled = {f"image-{i}": features(i % len(texts)) for i in range(96)}
    pairs = [(key, texts[i % len(texts)]) for i, key in enumerate(pooled)]
    refit_retrieval(siglip, pooled, pairs, tokenizer,
                    TrainConfig(output_dir=str(tmp_path), epochs=25, batch_size=16, lr=1e-3, progress=False))

    unseen = torch.stack([features(i % len(texts)) for i in range(30)])
    tokens = tokenizer(texts, padding=True, add_special_tokens=False, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        scores = siglip.embed_image_features(unseen) @ siglip.encode_text(tokens["input_ids"], tokens["attention_mask"]).T
    accuracy = (scores.argmax(1) == torch.arange(30) % len(texts)).float().mean()
    assert accuracy >= 0.9
