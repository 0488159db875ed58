"""Pipeline latency: model load, volume encode, time to first token, tokens/s, first vs follow-up.

    python benchmarks/bench_pipeline.py                    # bundled demo model, CPU or GPU (auto)
    python benchmarks/bench_pipeline.py --model FOLDER --device cuda --dtype bfloat16
    python benchmarks/bench_pipeline.py --quantization 8bit   # or 4bit: bitsandbytes LM layers

Each figure is the median over --runs repetitions on the bundled CT sample (a fresh pipeline per
load measurement; the encode cache is cleared before each encode measurement). "first question"
includes encoding the volume; "follow-up" reuses the cached image tokens. "follow-up by file path"
asks about the --volume file again (its cache key is remembered, so it is not read again); with
--volume a full-size CT shows what a re-read would cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import med3dvlm
from med3dvlm.readers import read_volume
from med3dvlm.resources import sample_path

QUESTION = "What abnormalities are present?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantization", choices=("4bit", "8bit"), default=None)
    parser.add_argument("--volume", default=str(sample_path("ct_phantom.nii.gz")), help="CT file (default: the sample)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    volume = read_volume(args.volume)
    def load():
        return med3dvlm.load(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization)

    loads = [timed(load)[0] for _ in range(args.runs)]
    pipe = load()
    pipe.report(volume, max_new_tokens=8)  # warm-up

    encodes, firsts, follow_ups, by_path, ttfts, rates = [], [], [], [], [], []
    pipe.ask(args.volume, QUESTION)
    for _ in range(args.runs):
        pipe._tokens.clear()
        encodes.append(timed(lambda: pipe.encode(volume))[0])
        pipe._tokens.clear()
        firsts.append(timed(lambda: pipe.ask(volume, QUESTION))[0])
        follow_ups.append(timed(lambda: pipe.ask(volume, "How many abnormalities are there?"))[0])
        by_path.append(timed(lambda: pipe.ask(args.volume, "How many abnormalities are there?"))[0])
        stamps: list[float] = []
        start = time.perf_counter()
        text = pipe.report(volume, on_token=lambda piece: stamps.append(time.perf_counter()), max_new_tokens=128)
        tokens = len(pipe.tokenizer(text)["input_ids"])
        ttfts.append(stamps[0] - start)
        rates.append((tokens - 1) / max(stamps[-1] - stamps[0], 1e-9))

    device = str(pipe.device) + (f" ({torch.cuda.get_device_name()})" if pipe.device.type == "cuda" else "")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, dtype {pipe.dtype}, model {pipe.model_name}, "
          f"quantization {args.quantization or 'none'}")
    median = statistics.median
    for name, values, unit in (("model load", loads, "s"), ("volume encode", encodes, "s"),
                               ("first question (encode + answer)", firsts, "s"),
                               ("follow-up question (cached)", follow_ups, "s"),
                               ("follow-up by file path", by_path, "s"),
                               ("report: time to first token", ttfts, "s"), ("report: tokens per second", rates, "tok/s")):
        print(f"{name:36s} median {median(values):8.3f} {unit}   (min {min(values):.3f}, max {max(values):.3f})")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
