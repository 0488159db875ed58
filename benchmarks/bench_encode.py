"""Encoding volumes with the demo's image tower in batches, as the demo build does (``encoder_features``):
seconds per batch, and the CPU time the kernel spends handing memory back (system time, page faults).

torch's CPU allocator frees a batch's activations (hundreds of MB) to the operating system and
faults them in again at the next batch; an allocator that keeps freed pages (jemalloc with its
decay off) avoids that. Compare, from the repository root:

    python benchmarks/bench_encode.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \\
        python benchmarks/bench_encode.py
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import torch

from med3dvlm.loading import load_bundle
from med3dvlm.resources import demo_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="timed batches (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="volumes per batch (the build's: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_bundle(demo_model_dir())
    encoder = model.vision_tower.eval()
    shape = model.config.vision_config.input_size
    volumes = torch.randn(args.batch_size, 1, *shape, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        encoder(volumes)  # warm-up
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.batches):
            tick = time.perf_counter()
            encoder(volumes)
            times.append(time.perf_counter() - tick)
        after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - started
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")
    print(f"{args.batches} batches of {args.batch_size} volumes {tuple(shape)}: median {statistics.median(times):.2f} s "
          f"per batch; user {after.ru_utime - before.ru_utime:.1f} s, system {after.ru_stime - before.ru_stime:.1f} s "
          f"of {wall:.1f} s wall; {(after.ru_minflt - before.ru_minflt) / args.batches / 1e6:.2f} M page faults per batch; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
