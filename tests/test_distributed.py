"""Two CPU processes under torchrun (gloo): DDP keeps the ranks in step on disjoint data.

This file is both the test and, run under torchrun, the worker script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class IndexedData(Dataset):
    def __init__(self, n: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


def worker(out_dir: Path) -> None:
    from med3dvlm.train import TrainConfig, seed_everything, train
    from med3dvlm.distributed import cleanup, get_rank, get_world_size

    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    seen: list[int] = []

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.extend(batch["index"].tolist())
        return nn.functional.mse_loss(net(batch["x"]), batch["y"])

    cfg = TrainConfig(output_dir=str(out_dir / "run"), epochs=2, batch_size=2, grad_accum=2, lr=0.1,
                      log_every=1, progress=False)
    result = train(model, IndexedData(), cfg, loss_fn=loss_fn)
    rank = get_rank()
    torch.save(model.state_dict(), out_dir / f"weights_rank{rank}.pt")
    summary = {"world_size": get_world_size(), "steps": result.steps, "losses": result.losses, "seen": seen}
    (out_dir / f"summary_rank{rank}.json").write_text(json.dumps(summary))
    cleanup()


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summaries = [json.loads((tmp_path / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world_size"] == 2 and s["steps"] == 2 for s in summaries)
    assert summaries[0]["losses"] == summaries[1]["losses"]  # reported loss is the mean over ranks
    # Each epoch the two ranks share the 8 samples without overlap.
    for epoch in range(2):
        halves = [set(s["seen"][epoch * 4:(epoch + 1) * 4]) for s in summaries]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(8))

    torch.manual_seed(0)
    initial = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).state_dict()
    rank0, rank1 = (torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in initial:
        assert torch.equal(rank0[key], rank1[key]), key
        assert not torch.equal(rank0[key], initial[key]), key

    run = tmp_path / "run"
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs
    assert (run / "checkpoint-last" / "rng_state_rank1.pt").is_file()
    assert json.loads((run / "run_config.json").read_text())["grad_accum"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
