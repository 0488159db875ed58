"""Time `med3dvlm.preprocess.preprocess` on a CT-sized volume (default 512 x 512 x 300 int16).

What is timed: one call from the in-memory `Volume` (numpy voxels as a NIfTI reader returns them:
Fortran order, RAS-stored, so H and W must be flipped) to the model input tensor on the device:
validation, reorientation, CT window, foreground crop, trilinear resize. Reading the file is not
timed. On CUDA the host-to-device copy is included and the clock stops after synchronising.

    python benchmarks/bench_preprocess.py                 # CPU, 2 threads, preset med3dvlm
    python benchmarks/bench_preprocess.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from med3dvlm.preprocess import PRESETS, describe, preprocess
from med3dvlm.volume import Volume


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> Volume:
    """Air around an elliptic body (soft tissue with noise), lungs and a spine; int16 HU."""
    i, j, k = shape
    x = np.linspace(-1, 1, i, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, j, dtype=np.float32)[None, :]
    plane = np.full((i, j), -1000, np.int16)
    plane[(x / 0.85) ** 2 + (y / 0.6) ** 2 <= 1] = 40
    plane[((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 <= 1] = -850
    plane[(x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 <= 1] = 700
    noise = np.random.default_rng(seed).integers(-25, 25, size=(i, j, k), dtype=np.int16)
    array = np.asfortranarray(plane[:, :, None] + noise)  # nibabel hands out Fortran-order arrays
    affine = np.diag([0.7, 0.7, 1.25, 1.0])  # RAS storage
    return Volume(array, affine, modality="CT", source="ct-phantom")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--preset", default="med3dvlm", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("I", "J", "K"))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = PRESETS[args.preset]
    volume = ct_phantom(tuple(args.size))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times = []
    for run in range(args.warmup + args.runs):
        sync()
        start = time.perf_counter()
        out = preprocess(volume, config, device=device)
        sync()
        if run >= args.warmup:
            times.append(time.perf_counter() - start)

    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, numpy {np.__version__}, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine inflates the times)")
    print(f"input: {' x '.join(map(str, args.size))} {volume.array.dtype} CT -> output "
          f"{tuple(out.shape)} {out.dtype} on {out.device} (preset {args.preset})")
    for step in describe(volume, config):
        print(f"  - {step}")
    print(f"preprocess: median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms over {len(times)} runs ({args.warmup} warm-up)")


if __name__ == "__main__":
    main()
