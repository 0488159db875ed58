"""`med3dvlm train siglip|projector|instruct|demo`: each stage reads an M3D-layout dataset and
writes a folder the next stage (or the pipeline) loads.

    med3dvlm train siglip    --data ROOT --out runs/siglip
    med3dvlm train projector --data ROOT --siglip runs/siglip --out runs/projector [--lm QWEN2_FOLDER]
    med3dvlm train instruct  --data ROOT --model runs/projector --out runs/instruct [--lora-rank 16]
    med3dvlm train demo      --out resources/models/demo
    med3dvlm train medmap    --data MEDMOM_ROOT --out runs/medmap [pretrain.epochs=4 finetune.epochs=20]

Training options come from ``--config run.yaml`` and/or ``key=value`` overrides (see TrainConfig).
Under ``torchrun --nproc_per_node N -m med3dvlm.cli train ...`` each stage runs with DDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from ..loading import SIGLIP_FOLDER, load_bundle, load_siglip, save_bundle, save_siglip
from ..data.m3d import CAP_JSON, read_cap, read_vqa
from ..errors import Med3DVLMError
from ..models.dcformer import DCFormerConfig
from ..models.text import TextConfig
from ..preprocess import PRESETS
from ..tokenizer import load_tokenizer, train_tokenizer
from .examples import caption_examples, vqa_examples
from .stages import build_vlm, siglip_stage, vlm_stage
from .config import TrainConfig, parse_overrides
from .volumes import encoder_features, load_pixels

MEDMAP_STAGES = ("pretrain", "finetune")
STAGE_DEFAULTS = {
    "siglip": {"epochs": 10, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 100},
    "projector": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
    "instruct": {"epochs": 3, "batch_size": 8, "lr": 5e-5},
    # MedMAP's two stages: the demo detector's recipe before its finding evidence (train.medmap)
    "medmap.pretrain": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 5},
    "medmap.finetune": {"epochs": 8, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 5},
}


def _train_config(args, stage: str, overrides=None) -> TrainConfig:
    out = str(Path(args.out) / "run")
    overrides = args.overrides if overrides is None else overrides
    if args.config:
        return TrainConfig.from_file(args.config, [f"output_dir={out}", *overrides])
    return TrainConfig.from_dict({**STAGE_DEFAULTS[stage], "output_dir": out, **parse_overrides(overrides)})


def _captions(root: Path):
    if not (root / CAP_JSON).is_file():
        raise Med3DVLMError(f"{root} is not an M3D-layout dataset: {CAP_JSON} is missing "
                            "(make one with `med3dvlm phantoms`).")
    return read_cap(root / CAP_JSON, "train")


def _vqa(root: Path):
    tables = [root / "M3D-VQA" / name for name in ("M3D_VQA_train.csv", "M3D_VQA_open_train.csv")]
    return [item for table in tables if table.is_file() for item in read_vqa(table)]


def cmd_siglip(args) -> None:
    root = Path(args.data)
    caps = _captions(root)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer([c.text for c in caps])
    pixels = load_pixels([c.image_path for c in caps], PRESETS[args.preset])
    vision = DCFormerConfig.preset(args.variant, input_size=PRESETS[args.preset].shape)
    text = TextConfig(params={"vocab_size": len(tokenizer), "hidden_size": 256, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "intermediate_size": 1024,
                              "max_position_embeddings": args.max_text_length,
                              "pad_token_id": tokenizer.pad_token_id}, pooling="mean")
    model, _ = siglip_stage(pixels, [(str(c.image_path), c.text) for c in caps], tokenizer, vision, text,
                            args.embed_dim, _train_config(args, "siglip"), args.max_text_length)
    save_siglip(args.out, model, args.max_text_length)
    tokenizer.save_pretrained(args.out)
    print(f"SigLIP towers written to {args.out}")


def cmd_projector(args) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = Path(args.data)
    siglip = load_siglip(args.siglip)
    tokenizer = _lm_tokenizer(args.lm) if args.lm else load_tokenizer(args.siglip)
    if args.lm:  # a pre-trained Qwen2 LM from a local folder: frozen in this stage
        language_model = Qwen2ForCausalLM.from_pretrained(args.lm, local_files_only=True)
        language_model.resize_token_embeddings(len(tokenizer))
        lm_config = language_model.config
    else:  # a small LM from scratch: it must learn language too, so it trains with the projector
        lm_config, language_model = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=1024, tie_word_embeddings=True), None
    model = build_vlm(tokenizer, siglip.vision_config, lm_config, args.preset)
    model.vision_tower.load_state_dict(siglip.vision_encoder.state_dict())
    if language_model is not None:
        model.language_model = language_model
    caps = _captions(root)
    features = encoder_features(model.vision_tower, load_pixels([c.image_path for c in caps], PRESETS[args.preset]))
    vlm_stage(model, features, caption_examples(caps, model.config.num_image_tokens), tokenizer,
              _train_config(args, "projector"), train_lm=language_model is None)
    save_bundle(args.out, model.eval(), tokenizer)
    shutil.copytree(args.siglip, Path(args.out) / SIGLIP_FOLDER, dirs_exist_ok=True)
    print(f"Model with aligned projector written to {args.out}")


def _lm_tokenizer(folder: str):
    """A pre-trained LM's own tokenizer with the image placeholder added as a special token."""
    from transformers import PreTrainedTokenizerFast

    from ..prompts import IMAGE_TOKEN

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cmd_instruct(args) -> None:
    root = Path(args.data)
    model, tokenizer = load_bundle(args.model)
    caps, vqas = _captions(root), _vqa(root)
    preset = PRESETS[model.config.preprocess_preset]
    features = encoder_features(model.vision_tower,
                                load_pixels([c.image_path for c in caps] + [q.image_path for q in vqas], preset))
    n = model.config.num_image_tokens
    vlm_stage(model, features, caption_examples(caps, n) + vqa_examples(vqas, n), tokenizer,
              _train_config(args, "instruct"), train_lm=True, lora_rank=args.lora_rank)
    save_bundle(args.out, model.eval(), tokenizer)
    if (Path(args.model) / SIGLIP_FOLDER).is_dir():
        shutil.copytree(Path(args.model) / SIGLIP_FOLDER, Path(args.out) / SIGLIP_FOLDER, dirs_exist_ok=True)
    print(f"Instruction-tuned model written to {args.out}")


def cmd_demo(args) -> None:
    from .demo import DemoRecipe, train_demo

    given = {"n_phantoms": args.n, "seed": args.seed, "probe_gate": args.probe_gate}
    recipe = DemoRecipe.from_file(args.recipe) if args.recipe else DemoRecipe()
    recipe = dataclasses.replace(recipe, **{k: v for k, v in given.items() if v is not None})
    if args.segmenter_rounds is not None:
        recipe.segmenter["rounds"] = args.segmenter_rounds
    if args.more_vlm or args.realign:
        from .vlm_more import more_vlm

        if not args.resume:
            raise Med3DVLMError("--more-vlm and --realign continue a built model: name it with --resume "
                                "(e.g. --resume demo).")
        record = more_vlm(args.out, args.work, _demo_folder(args.resume), recipe, realign=args.realign,
                          more=args.more_vlm)
        done = [f"a projector aligned afresh on {record['projector_realigned_on']} phantoms"] if args.realign else []
        if args.more_vlm:
            epochs = record['options']['epochs']
            done.append(f"{epochs} more epoch{'s' if epochs != 1 else ''} of its last stage (loss "
                        f"{record['vlm_loss'][0]:.3f} -> {record['vlm_loss'][1]:.3f})")
        print(f"Demo model written to {args.out} in {record['seconds']:.0f} s: {' and '.join(done)}; "
              f"evaluate it with: med3dvlm evaluate --model {args.out}")
        return
    summary = train_demo(args.out, args.work, recipe, resume=_demo_folder(args.resume))
    probes, language = summary["probes"], summary["language_gate"]
    print(f"Demo model written to {args.out} in {sum(summary['seconds'].values()):.0f} s "
          f"({summary['cpu_seconds']:.0f} CPU s); language gate on oracle tokens: recall "
          f"{language['report_recall']:.3f}, closed VQA {language['closed_vqa_accuracy']:.3f}; image-token probe "
          f"(organ x kind macro AUC on unseen phantoms): encoder {probes['encoder_tokens']['macro_auc']:.3f}, "
          f"projector {probes['projector_tokens']['macro_auc']:.3f}; evaluate it with: "
          f"med3dvlm evaluate --model {args.out}")


def _demo_folder(name: str | None) -> Path | None:
    """--resume's folder: "demo" is the shipped demo model."""
    if name is None:
        return None
    from ..resources import demo_model_dir

    return demo_model_dir() if name == "demo" else Path(name)


def _medmap_configs(args) -> dict[str, TrainConfig]:
    """One TrainConfig per MedMAP stage: ``key=value`` applies to both, ``pretrain.key=value`` to one."""
    shared = [o for o in args.overrides if not o.startswith(tuple(f"{s}." for s in MEDMAP_STAGES))]
    return {stage: _train_config(args, f"medmap.{stage}",
                                 shared + [o.split(".", 1)[1] for o in args.overrides if o.startswith(f"{stage}.")])
            for stage in MEDMAP_STAGES}


def cmd_medmap(args) -> None:
    import torch

    from .medmap_run import train_medmap

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = _medmap_configs(args)
    resume = bool(configs["pretrain"].resume or configs["finetune"].resume)
    architecture = {"input_size": tuple(args.input_size), "backbone": args.backbone, "dcformer_variant": args.variant,
                    "embed_dim": args.embed_dim,
                    "text": TextConfig("bert", {"vocab_size": 1, "hidden_size": args.text_width,
                                                "num_hidden_layers": args.text_layers, "num_attention_heads": 4,
                                                "intermediate_size": 4 * args.text_width,
                                                "max_position_embeddings": 160}, "mean")}
    summary = train_medmap(args.data, args.out, configs, architecture=architecture, vocab_size=args.vocab_size,
                           full_study_p=args.full_study_p, resume=resume)
    if summary is not None:
        study = summary["subsets"]["study"]["labels"]["macro"]
        print(f"MedMAP detector written to {args.out} (thresholds from {summary['thresholds_from']}: "
              f"macro AUC {study['auc']}, macro F1 {study['f1']}); evaluate it with: "
              f"med3dvlm evaluate-detection --model {args.out} --data {args.data} --split test")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a stage: siglip, projector, instruct, the demo model, or MedMAP")
    stages = train.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_: str, func) -> argparse.ArgumentParser:
        p = stages.add_parser(name, help=help_)
        p.add_argument("--out", required=True, help="output folder")
        p.set_defaults(func=func)
        if name != "demo":
            p.add_argument("--data", required=True, help="root of an M3D-layout dataset (MedMoM layout for medmap)")
            p.add_argument("--config", help="training options (JSON or YAML)")
            p.add_argument("overrides", nargs="*", help="training options as key=value (e.g. lr=3e-4)")
        return p

    p = stage("siglip", "SigLIP pre-training of the DCFormer image tower and a text tower", cmd_siglip)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--variant", default="nano", choices=["nano", "tiny", "small", "base"])
    p.add_argument("--tokenizer", help="tokenizer folder (default: train one on the dataset's reports)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--max-text-length", type=int, default=256)
    p = stage("projector", "projector alignment on captions (a pre-trained LM stays frozen)", cmd_projector)
    p.add_argument("--siglip", required=True, help="folder written by `train siglip`")
    p.add_argument("--lm", help="local Qwen2 model folder (default: a small LM trained from scratch)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p = stage("instruct", "instruction tuning on reports and VQA", cmd_instruct)
    p.add_argument("--model", required=True, help="folder written by `train projector`")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank, merged at the end")
    p = stage("demo", "build the demo model from fresh phantoms (well over an hour on 2 CPU cores)", cmd_demo)
    p.add_argument("--work", default="runs/demo-work", help="folder for phantoms and checkpoints")
    p.add_argument("-n", type=int, help="phantoms for the VLM stage (default: the recipe's 4000; the image tower has 1500 of its own)")
    p.add_argument("--seed", type=int, help="phantom and training seed (default: 0)")
    p.add_argument("--probe-gate", type=float,
                   help="image-token probe macro AUC needed before the VLM stage (default 0.95; 0: always go on)")
    p.add_argument("--recipe", metavar="FILE",
                   help="JSON of recipe fields to change (e.g. scripts/demo_gpu_recipe.json for one GPU)")
    p.add_argument("--resume", metavar="FOLDER", nargs="?", const="demo",
                   help="continue from a demo model folder (default: the shipped one): keep its tokenizer and "
                        "DCFormer/text towers, train its finding segmenter further (the work folder's run "
                        "continues where it stopped)")
    p.add_argument("--segmenter-rounds", type=int,
                   help="rounds of 250 segmenter steps, each scored on unseen phantoms (default: the recipe's 6)")
    p.add_argument("--more-vlm", action="store_true",
                   help="with --resume: only continue that model's last stage (projector + language model on "
                        "the tower's tokens) for the recipe's vlm_more epochs")
    p.add_argument("--realign", action="store_true",
                   help="with --resume: align a fresh projector to the oracle layout on the VLM's phantoms and the "
                        "recipe's alignment_phantoms (before --more-vlm's epochs, if given)")
    p = stage("medmap", "MedMAP on MedMoM-layout MRI data: modality-aware pre-training, fine-tuning with the "
                        "text tower frozen, validation thresholds (options: key=value for both stages, "
                        "pretrain.key=value / finetune.key=value for one; resume=true continues)", cmd_medmap)
    p.add_argument("--input-size", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"),
                   help="model input size (default: 32 64 64)")
    p.add_argument("--backbone", default="dcformer", choices=["dcformer", "swin"])
    p.add_argument("--variant", default="nano", choices=["nano", "tiny", "small", "base"], help="DCFormer size")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary trained on the reports")
    p.add_argument("--full-study-p", type=float, default=0.25,
                   help="share of fine-tuning steps that show a study whole, else one or two of its volumes "
                        "(default: 0.25; 1.0 learns full studies fastest)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
