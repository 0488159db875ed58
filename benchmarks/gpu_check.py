"""GPU check: a full-size random-weight Med3DVLM-Qwen-2.5-7B folder in the official layout, timed.

Builds the folder (no download: random weights made on the GPU and saved as safetensors shards),
then for bfloat16, 8-bit and 4-bit: load time, volume encode, time to first token of a first
question (new volume) and of a follow-up (cached volume), decode tokens/s at batch 1, peak GPU
memory, and one evidence map of an answer (SmoothGrad, the Slicer module's default 8 passes: its
seconds and its own peak GPU memory, the backward pass included). Runs the CUDA-only tests and
writes benchmarks/results/gpu_check_<date>[_tiny].json.

``--tiny`` runs the same code on the CPU with a tiny config in seconds (CI checks the script).
Decode speed is timed on ``model.generate`` with min_new_tokens = max_new_tokens, since random
weights may pick the end token; the times to first token go through ``Pipeline.ask``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config

import med3dvlm
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.models.projector import ProjectorConfig
from med3dvlm.models.vlm import Med3DVLM, Med3DVLMConfig
from med3dvlm.official import official_name
from med3dvlm.prompts import IMAGE_TOKEN, vqa_prompt
from med3dvlm.provenance import weights_digest
from med3dvlm.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"decode_tokens_per_s": 110.0, "followup_ttft_ratio": 0.3}  # 7B, batch 1, bfloat16
# Qwen2.5-7B-Instruct's language model, as in the released config.json.
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
# (D, H, W): the pipeline resizes official-folder input to the released size, so tiny keeps it too.
INPUT = {"full": (128, 256, 256), "tiny": (128, 256, 256)}
WORDS = "the liver spleen kidney lesion cyst mass normal is there a in of which organ".split()


def write_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <im_patch> and Qwen's end token: ids stay below the model's vocabulary."""
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", additional_special_tokens=[IMAGE_TOKEN])
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def random_tensor(name: str, shape, dtype, device) -> torch.Tensor:
    """Values a trained model could hold: unit norms, positive variances, small weights (no NaN on the way)."""
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if name.endswith("running_var") or re.search(r"(norm|ln\d?|layernorm)\.weight$", name):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()


def build_folder(folder: Path, tiny: bool, shard_bytes: int) -> dict:
    """config.json, tokenizer and sharded safetensors + index, with the official tensor names."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    depth, height, width = INPUT["tiny" if tiny else "full"]
    text = Qwen2Config(**(QWEN_TINY if tiny else QWEN_7B), eos_token_id=0, pad_token_id=0, bos_token_id=None)
    vision = DCFormerConfig.preset("small", (depth, height, width))
    sizes = dict(low_output_size=(6, 4), high_output_size=(3, 4)) if tiny else {}
    projector = ProjectorConfig.for_encoder(vision, text.hidden_size, **sizes)
    config = Med3DVLMConfig(text, vision, projector, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Med3DVLM(config).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    shard, shard_size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            files.append(file)
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_size = {}, 0

    for name, shape in shapes.items():
        tensor = random_tensor(name, shape, torch.bfloat16, device)
        shard[official_name(name)] = tensor
        shard_size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if shard_size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    low, high = projector.low_input_size, projector.high_input_size
    (folder / "config.json").write_text(json.dumps({
        **text.to_dict(), "model_type": "vlm_qwen", "architectures": ["VLMQwenForCausalLM"], "vision_tower": "dcformer",
        "input_size": [height, width, depth], "vision_select_layer": -2, "vision_select_feature": "cls_patch",
        "mm_projector_type": "mixer", "mm_mlp_depth": 2, "proj_out_num": projector.num_tokens,
        "low_output_size": list(projector.low_output_size), "high_output_size": list(projector.high_output_size),
        "low_input_size": list(low), "high_input_size": list(high), "mm_hidden_size": 768,
        "torch_dtype": "bfloat16", "use_cache": False}))
    return {"bytes": total, "shards": len(files), "tensors": len(shapes), "seconds": time.perf_counter() - started}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def measure_explain(pipe, volume: Volume, question: str, dev: torch.device, samples: int) -> dict:
    """Seconds and peak GPU memory of the evidence map of an answer to ``question``, as Show evidence
    asks the server for it; an error (say, a backward pass beyond the GPU's memory) is recorded."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        seconds, evidence = _timed(lambda: pipe.explain(volume, question, "the liver", samples=samples), dev)
    except Exception as error:
        return {"explain_error": f"{type(error).__name__}: {error}"}
    return {"explain_samples": samples, "explain_s": seconds, "explain_pass_s": seconds / samples,
            "explain_peak_gpu_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "explain_map_nonzero": bool(np.abs(evidence.map.array).sum() > 0)}


def measure(folder: Path, quantization: str | None, device: str, input_size, new_tokens: int,
            explain_samples: int) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    weights_digest(folder)  # hashed once per file version for provenance: not part of the load time
    # bfloat16 on the GPU; the CPU (--tiny) computes in float32: without native bfloat16 (no AVX512-BF16, e.g.
    # an AMD EPYC of 2026-12-07) one tiny bfloat16 encode took over 100 s and the CI smoke run timed out.
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    load_s, pipe = _timed(lambda: med3dvlm.load(folder, device=device, dtype=dtype, quantization=quantization), dev)
    rng = np.random.default_rng(0)
    volumes = [Volume(rng.random(input_size[::-1], dtype=np.float32), np.eye(4), modality="CT") for _ in range(3)]
    pipe.encode(volumes[0])  # warm-up: kernels, allocator
    encode_s, _ = _timed(lambda: pipe.encode(volumes[1]), dev)
    question, followup = "which organ has the lesion", "is there a cyst in the liver"
    first_s, answer = _timed(lambda: pipe.ask(volumes[2], question, max_new_tokens=1), dev)
    followup_s, _ = _timed(lambda: pipe.ask(volumes[2], followup, history=[(question, answer)], max_new_tokens=1), dev)
    ids = pipe.tokenizer(vqa_prompt(pipe.num_image_tokens, question), return_tensors="pt")["input_ids"].to(dev)
    tokens = pipe.encode(volumes[2])

    def generate(n):
        with torch.inference_mode():
            return pipe.model.generate(tokens, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=pipe.tokenizer.pad_token_id)

    generate(4)  # warm-up of the decode path
    one_s, _ = _timed(lambda: generate(1), dev)
    many_s, out = _timed(lambda: generate(new_tokens + 1), dev)
    result = {"quantization": quantization or "none (bfloat16)", "dtype": dtype, "load_s": load_s, "encode_s": encode_s,
              "ttft_first_s": first_s, "ttft_followup_s": followup_s, "followup_ttft_ratio": followup_s / first_s,
              "decode_tokens": int(out.shape[1]) - 1, "decode_tokens_per_s": new_tokens / max(many_s - one_s, 1e-9),
              "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    result.update(measure_explain(pipe, volumes[2], question, dev, explain_samples))
    del pipe, tokens
    gc.collect()
    return result


def cuda_tests() -> list[str]:
    """Node ids of the tests that are skipped without a CUDA GPU."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"skipif\(not torch\.cuda\.is_available\(\)[^\n]*\n(?:@[^\n]*\n)*def (test_\w+)", text):
            found.append(f"tests/{path.name}::{match.group(1)}")
    return found


def run_cuda_tests(tiny: bool) -> dict:
    tests = cuda_tests()
    if tiny or not torch.cuda.is_available():
        return {"tests": tests, "ran": False, "why": "--tiny or no CUDA GPU"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *tests], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    return {"tests": tests, "ran": True, "returncode": done.returncode, "tail": done.stdout[-1500:]}


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def print_table(results: dict) -> None:
    print(f"{'mode':18s} {'load s':>8s} {'encode s':>9s} {'TTFT 1st s':>11s} {'TTFT f/u s':>11s} {'f/u ratio':>10s} "
          f"{'tok/s':>8s} {'peak GiB':>9s} {'explain s':>10s} {'expl. GiB':>10s}")
    gib = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    for r in results["modes"]:
        if "error" in r:
            print(f"{r['quantization']:18s} error: {r['error']}")
            continue
        explain = "error" if "explain_error" in r else f"{r['explain_s']:.2f}"
        print(f"{r['quantization']:18s} {r['load_s']:8.2f} {r['encode_s']:9.3f} {r['ttft_first_s']:11.3f} "
              f"{r['ttft_followup_s']:11.3f} {r['followup_ttft_ratio']:10.2f} {r['decode_tokens_per_s']:8.1f} "
              f"{gib(r['peak_gpu_memory_gib']):>9s} {explain:>10s} {gib(r.get('explain_peak_gpu_memory_gib')):>10s}")
        if "explain_error" in r:
            print(f"  explain: {r['explain_error']}")
    bf16 = results["modes"][0]
    if "error" not in bf16:
        scale = "7B" if not results["tiny"] else "tiny config (targets are for the 7B on a GPU)"
        print(f"targets, {scale}, bfloat16, batch 1:")
        print(f"  decode {bf16['decode_tokens_per_s']:.1f} tokens/s   (target >= {TARGETS['decode_tokens_per_s']:.0f})")
        print(f"  follow-up TTFT {bf16['followup_ttft_ratio']:.2f} x the first question's   "
              f"(target <= {TARGETS['followup_ttft_ratio']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (seconds; for CI)")
    parser.add_argument("--work", help="where the random-weight folder is written (default: a temporary folder)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--modes", default="bf16,8bit,4bit", help="comma-separated: bf16, 8bit, 4bit")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens timed (default 128; tiny 16)")
    parser.add_argument("--explain-samples", type=int, default=None,
                        help="passes of the evidence map timed (default 8, the Slicer module's; tiny 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.tiny:
        torch.set_num_threads(1)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    explain_samples = args.explain_samples or (1 if args.tiny else 8)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        folder = Path(tmp) / ("Med3DVLM-Qwen-tiny" if args.tiny else "Med3DVLM-Qwen-2.5-7B-random")
        build = build_folder(folder, args.tiny, shard_bytes=(8 << 20) if args.tiny else (4 << 30))
        print(f"built {folder.name}: {build['bytes'] / 2**30:.2f} GiB in {build['shards']} shards, "
              f"{build['seconds']:.1f} s", flush=True)
        modes = []
        for mode in args.modes.split(","):
            quantization = None if mode == "bf16" else mode
            try:
                modes.append(measure(folder, quantization, device, INPUT["tiny" if args.tiny else "full"], new_tokens,
                                     explain_samples))
            except Exception as error:  # e.g. bitsandbytes missing: the other modes still count
                modes.append({"quantization": quantization or "none (bfloat16)", "error": f"{type(error).__name__}: {error}"})
            print(f"  measured {mode}", flush=True)
    results = {"date": datetime.date.today().isoformat(), "tiny": args.tiny, "device": device, "machine": machine(),
               "model": "random weights, official Med3DVLM-Qwen-2.5-7B layout" if not args.tiny else "tiny config",
               "build": build, "new_tokens": new_tokens, "targets": TARGETS, "modes": modes,
               "cuda_tests": run_cuda_tests(args.tiny)}
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{results['date']}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {path} ({results['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
