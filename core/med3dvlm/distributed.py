"""torch.distributed helpers for runs launched with ``torchrun`` (or a single plain process).

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; when WORLD_SIZE is
missing or 1 every helper here degrades to the single-process answer, so training, evaluation
and batch inference can call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """Number of processes torchrun launched (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True once a process group with more than one member is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 logs, shows progress and writes files."""
    return get_rank() == 0


def select_device(local_rank: int = 0, requested: str | None = None) -> torch.device:
    """The device for this process: ``requested`` if given, else its own GPU, else the CPU."""
    if requested:
        device = torch.device(requested)
        # A bare "cuda" under torchrun must still mean this process's GPU, not GPU 0 for all.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; idempotent.

    The backend follows the device: NCCL for CUDA, gloo for the CPU.
    """
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = select_device(local_rank, device)
    if world_size > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank=get_rank(), local_rank=local_rank, world_size=get_world_size(), device=target)


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a Python number over all ranks (identity in a single process)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def cleanup() -> None:
    """Leave the process group so the process can exit cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
