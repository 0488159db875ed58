"""A generic training loop: any ``nn.Module``, any map-style dataset, one or many processes.

The concrete stages (SigLIP, projector alignment, instruction tuning, MedMAP) only choose the
model, the dataset, the loss and the trainable parameters; seeding, the optimiser, the
warm-up + cosine schedule, gradient accumulation and clipping, mixed precision, progress,
checkpoints that resume bit-exactly and DistributedDataParallel under ``torchrun`` live here.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ..distributed import DistInfo, all_reduce_mean, init_distributed
from ..errors import Med3DVLMError, ModelError
from .checkpoint import CHECKPOINT_DIR, resume, save_checkpoint
from .config import AMP_DTYPES, TrainConfig

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    losses: list[float]  # mean loss per optimiser step over all ranks, whole run (resumes included)
    steps: int
    output_dir: Path
    checkpoint: Path


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_trainable(model: nn.Module, trainable: Callable[[str], bool] | Iterable[str] | str | None) -> list[str]:
    """Names of the parameters to train; with a selector, freezes every other parameter.

    ``None`` keeps the model's own ``requires_grad`` flags; a string or list of strings selects
    parameters by module prefix (``"mm_projector"``); a callable receives each parameter name.
    """
    if trainable is not None:
        if callable(trainable):
            wanted = trainable
        else:
            prefixes = (trainable,) if isinstance(trainable, str) else tuple(trainable)
            wanted = lambda name: any(_under(name, p) for p in prefixes)  # noqa: E731
            all_names = [name for name, _ in model.named_parameters()]
            unmatched = [p for p in prefixes if not any(_under(name, p) for name in all_names)]
            if unmatched:
                raise ModelError(f"{type(model).__name__} has no parameters under {unmatched}; check 'trainable'.")
        for name, param in model.named_parameters():
            param.requires_grad_(bool(wanted(name)))
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise ModelError(f"No trainable parameters selected in {type(model).__name__}; check the 'trainable' selector.")
    return names


class _LossModule(nn.Module):
    """Model + loss as one module, so DDP sees (and synchronises) whatever the loss calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any] | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            output = self.loss_fn(self.model, batch)
        elif isinstance(batch, Mapping):
            output = self.model(**batch)
        elif isinstance(batch, (tuple, list)):
            output = self.model(*batch)
        else:
            output = self.model(batch)
        return _extract_loss(output, type(self.model).__name__)


def _extract_loss(output: Any, model_name: str) -> torch.Tensor:
    loss = output
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif not isinstance(output, torch.Tensor):
        loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ModelError(
            f"{model_name} returned no scalar 'loss' (got {type(output).__name__}); "
            "return a dict with 'loss' from forward or pass loss_fn(model, batch)."
        )
    return loss.reshape(())


class _SkipSampler(Sampler[int]):
    """The epoch's indices minus those already consumed before a resume (not even loaded)."""

    def __init__(self, base: DistributedSampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def _seed_worker(_: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuples too
    return batch


class _Optimization:
    """AdamW + warm-up/cosine schedule + (fp16 only) loss scaling, checkpointed together."""

    def __init__(self, params: list[nn.Parameter], config: TrainConfig, total_steps: int, use_cuda: bool) -> None:
        self.params, self.grad_clip = params, config.grad_clip
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases/norms
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and config.amp_dtype == "float16")

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _epoch_loader(dataset: Dataset, sampler: DistributedSampler, epoch: int, first_batch: int, config: TrainConfig,
                  collate_fn: Callable | None, info: DistInfo) -> DataLoader:
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=_SkipSampler(sampler, first_batch * config.batch_size),
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=_seed_worker,
        # Own generator per (seed, epoch, rank): the loader never draws from the global RNG.
        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1_009 + info.rank),
    )


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    trainable: Callable[[str], bool] | Iterable[str] | str | None = None,
) -> TrainResult:
    """Train ``model`` in place and return the loss curve.

    The loss is ``loss_fn(model, batch)`` when given, else ``model(**batch)["loss"]`` (HF style);
    either may return a scalar tensor or a mapping/object with ``loss``. Under torchrun with
    WORLD_SIZE > 1 the process group is joined here (leave it with ``distributed.cleanup()``).
    Seed the model's construction yourself; this seeds everything the loop itself draws.
    """
    info = init_distributed(config.device)
    output_dir = Path(config.output_dir)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "run_config.json")
    seed_everything(config.seed + info.rank)
    names = select_trainable(model, trainable)
    model.to(info.device)
    model.train()

    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=config.shuffle,
                                 seed=config.seed)
    batches_per_epoch = math.ceil(len(sampler) / config.batch_size)
    if batches_per_epoch == 0:
        raise Med3DVLMError("The training dataset is empty.")
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    use_cuda = info.device.type == "cuda"
    optim = _Optimization([p for p in model.parameters() if p.requires_grad], config, total_steps, use_cuda)
    step, losses = resume(config, model, optim, info) if config.resume else (0, [])
    autocast_on = use_cuda and config.amp_dtype != "float32"

    net: nn.Module = _LossModule(model, loss_fn)
    ddp = info.world_size > 1
    if ddp:
        net = DistributedDataParallel(net, device_ids=[info.device.index] if use_cuda else None,
                                      find_unused_parameters=config.find_unused_parameters)
    if info.is_main:
        logger.info("Training %d tensors for %d steps on %s", len(names), total_steps, info.device)
    progress = tqdm(total=total_steps, initial=step, disable=not (info.is_main and config.progress), desc="train")
    window, started, checkpoint = [], time.perf_counter(), output_dir / CHECKPOINT_DIR

    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        first_batch = step_in_epoch * config.grad_accum
        step_loss = 0.0
        for index, batch in enumerate(_epoch_loader(dataset, sampler, epoch, first_batch, config, collate_fn, info),
                                      start=first_batch):
            group_start = index - index % config.grad_accum  # the last group of an epoch may be short
            group_size = min(config.grad_accum, batches_per_epoch - group_start)
            last = index - group_start + 1 == group_size
            with net.no_sync() if ddp and not last else nullcontext():  # all-reduce once per step
                with torch.autocast("cuda", dtype=AMP_DTYPES[config.amp_dtype], enabled=autocast_on):
                    loss = net(_to_device(batch, info.device))
                optim.backward(loss / group_size)
            step_loss += loss.detach().float().item() / group_size
            if not last:
                continue
            lr = optim.lr  # the rate this step used; the schedule moves on inside step()
            optim.step()
            step += 1
            mean_loss, step_loss = all_reduce_mean(step_loss, info.device), 0.0
            if not math.isfinite(mean_loss):
                raise ModelError(f"Training loss became {mean_loss} at step {step}; lower lr or check the data.")
            losses.append(mean_loss)
            window.append(mean_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if step % config.log_every == 0 or step == total_steps:
                if info.is_main:
                    record = {"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": lr,
                              "elapsed_s": round(time.perf_counter() - started, 3)}
                    with (output_dir / "train_log.jsonl").open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                window = []
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                training = {"step": step, "losses": losses, "world_size": info.world_size, **optim.state_dict()}
                checkpoint = save_checkpoint(output_dir, model, names, training, info)
            if step >= total_steps:
                break
    progress.close()
    return TrainResult(losses=losses, steps=step, output_dir=output_dir, checkpoint=checkpoint)
