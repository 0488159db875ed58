"""`med3dvlm train siglip|projector|instruct|demo`: each stage reads an M3D-layout dataset and
writes a folder the next stage (or the pipeline) loads.

    med3dvlm train siglip    --data ROOT --out runs/siglip
    med3dvlm train projector --data ROOT --siglip runs/siglip --out runs/projector [--lm QWEN2_FOLDER]
    med3dvlm train instruct  --data ROOT --model runs/projector --out runs/instruct [--lora-rank 16]
    med3dvlm train demo      --out resources/models/demo

Training options come from ``--config run.yaml`` and/or ``key=value`` overrides (see TrainConfig).
Under ``torchrun --nproc_per_node N -m med3dvlm.cli train ...`` each stage runs with DDP.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..checkpoints import SIGLIP_FOLDER, load_bundle, load_siglip, save_bundle, save_siglip
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

STAGE_DEFAULTS = {
    "siglip": {"epochs": 10, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 100},
    "projector": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
    "instruct": {"epochs": 3, "batch_size": 8, "lr": 5e-5},
}


def _train_config(args, stage: str) -> TrainConfig:
    out = str(Path(args.out) / "run")
    if args.config:
        return TrainConfig.from_file(args.config, [f"output_dir={out}", *args.overrides])
    return TrainConfig.from_dict({**STAGE_DEFAULTS[stage], "output_dir": out, **parse_overrides(args.overrides)})


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

    recipe = DemoRecipe(n_phantoms=args.n, seed=args.seed)
    summary = train_demo(args.out, args.work, recipe)
    print(f"Demo model written to {args.out} in {sum(summary['seconds'].values()):.0f} s; "
          f"evaluate it with: med3dvlm evaluate --model {args.out}")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a stage: siglip, projector, instruct, or the demo model")
    stages = train.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_: str, func) -> argparse.ArgumentParser:
        p = stages.add_parser(name, help=help_)
        p.add_argument("--out", required=True, help="output folder")
        p.set_defaults(func=func)
        if name != "demo":
            p.add_argument("--data", required=True, help="root of an M3D-layout dataset")
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
    p = stage("demo", "build the demo model from fresh phantoms (about 25 min on 2 CPU cores)", cmd_demo)
    p.add_argument("--work", default="runs/demo-work", help="folder for phantoms and checkpoints")
    p.add_argument("-n", type=int, default=1000, help="number of training phantoms")
    p.add_argument("--seed", type=int, default=0)
