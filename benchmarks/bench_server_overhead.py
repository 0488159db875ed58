"""What the model server costs against the in-process pipeline, with the same model and threads:
time to first token of a first question (upload + encode + answer) and of a follow-up (image
tokens cached), and tokens per second of a report.

    python benchmarks/bench_server_overhead.py [--model demo] [--threads 1] [--runs 7]

Prints one Markdown row per front end for benchmarks/README.md (section "Model server overhead").
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Is there a lesion in the liver?"


def timed(call) -> tuple[float, float, int]:
    """(seconds to the first piece, seconds from first to last piece, pieces)"""
    times: list[float] = []
    start = time.perf_counter()
    call(lambda piece: times.append(time.perf_counter()))
    return times[0] - start, times[-1] - times[0], len(times)


def measure(pipe, volumes, runs: int) -> dict[str, float]:
    firsts, follow_ups, rates = [], [], []
    for volume in volumes[:runs]:  # a new volume each time: upload (server) and encode
        firsts.append(timed(lambda on_token: pipe.ask(volume, QUESTION, on_token=on_token))[0])
        follow_ups.append(timed(lambda on_token: pipe.ask(volume, "Are the kidneys normal?", on_token=on_token))[0])
        _, span, pieces = timed(lambda on_token: pipe.report(volume, on_token=on_token))
        rates.append((pieces - 1) / span)
    return {"first": float(np.median(firsts)), "follow_up": float(np.median(follow_ups)),
            "rate": float(np.median(rates))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    import torch

    import med3dvlm
    from med3dvlm.data.phantoms import make_ct_phantom

    torch.set_num_threads(args.threads)
    volumes = [make_ct_phantom(seed).volume for seed in range(2 * args.runs + 2)]
    local = med3dvlm.load(args.model, device="cpu")
    measure(local, volumes[-2:], 1)  # warm-up
    in_process = measure(local, volumes[:args.runs], args.runs)
    del local

    with tempfile.TemporaryDirectory() as folder:
        ready = Path(folder) / "ready.json"
        server = subprocess.Popen([sys.executable, "-m", "med3dvlm.cli", "serve", "--port", "0", "--model", args.model,
                                   "--device", "cpu", "--threads", str(args.threads), "--ready-file", str(ready),
                                   "--log-level", "warning"], stdin=subprocess.PIPE)
        try:
            while not ready.exists():
                time.sleep(0.05)
            import json

            remote = med3dvlm.connect(json.loads(ready.read_text())["url"])
            measure(remote, volumes[-2:], 1)  # warm-up: loads the model
            served = measure(remote, volumes[args.runs:2 * args.runs], args.runs)
        finally:
            server.terminate()
            server.wait()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for name, figures in (("in-process", in_process), ("server, loopback", served)):
        print(f"| {args.model}, {args.threads} thread(s) | {name} | {machine} | {figures['first'] * 1000:.0f} ms | "
              f"{figures['follow_up'] * 1000:.0f} ms | {figures['rate']:.0f} tok/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
