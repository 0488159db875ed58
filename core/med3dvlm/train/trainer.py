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
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ..errors import Med3DVLMError, ModelError
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint-last"
_SCHEDULES = ("cosine", "constant")
_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TrainConfig:
    """Everything that defines a run; written to ``<output_dir>/run_config.json`` at start.

    ``max_steps`` (optimiser steps) wins over ``epochs`` when set. ``batch_size`` is per process.
    ``amp_dtype`` applies on CUDA only; the CPU always trains in float32. ``resume`` is False,
    True (``<output_dir>/checkpoint-last``) or the path of a checkpoint folder.
    """

    output_dir: str = "runs/train"
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_every: int = 10
    save_every: int = 0
    num_workers: int = 0
    shuffle: bool = True
    amp_dtype: str = "bfloat16"
    device: str | None = None
    find_unused_parameters: bool = False
    resume: bool | str = False
    progress: bool = True

    def __post_init__(self) -> None:
        # YAML reads "1e-4" as a string and JSON has no tuples: normalise, then validate.
        try:
            self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
            self.min_lr_ratio = float(self.min_lr_ratio)
            self.betas = (float(self.betas[0]), float(self.betas[1]))
            self.grad_clip = None if self.grad_clip is None else float(self.grad_clip)
        except (TypeError, ValueError, IndexError) as error:
            raise Med3DVLMError(f"Invalid training configuration: an option is not a number ({error}).") from None
        counts = ("seed", "epochs", "batch_size", "warmup_steps", "grad_accum", "log_every", "save_every",
                  "num_workers")
        problems = [f"{name} must be an integer" for name in counts if type(getattr(self, name)) is not int]
        if problems:
            raise Med3DVLMError(f"Invalid training configuration: {'; '.join(problems)}.")
        checks = (
            (min(self.batch_size, self.grad_accum, self.log_every) < 1,
             "batch_size, grad_accum and log_every must be >= 1"),
            (self.max_steps is None and self.epochs < 1, "epochs must be >= 1"),
            (self.max_steps is not None and (type(self.max_steps) is not int or self.max_steps < 1),
             "max_steps must be an integer >= 1"),
            (self.lr <= 0, "lr must be > 0"),
            (self.warmup_steps < 0 or self.save_every < 0, "warmup_steps and save_every must be >= 0"),
            (self.schedule not in _SCHEDULES, f"schedule must be one of {_SCHEDULES}"),
            (self.amp_dtype not in _AMP_DTYPES, f"amp_dtype must be one of {tuple(_AMP_DTYPES)}"),
        )
        problems = [text for bad, text in checks if bad]
        if problems:
            raise Med3DVLMError(f"Invalid training configuration: {'; '.join(problems)}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Med3DVLMError(f"Unknown training option(s) {unknown}; valid options are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()):
        """Read a JSON or YAML file, then apply command-line ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise Med3DVLMError(f"Training config {path} does not exist.")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            else:
                raise Med3DVLMError(f"Training config {path} must end in .json, .yaml or .yml.")
        except (ValueError, yaml.YAMLError) as error:
            raise Med3DVLMError(f"Training config {path} is not valid {path.suffix[1:].upper()}: {error}") from error
        if not isinstance(data, dict):
            raise Med3DVLMError(f"Training config {path} must hold a mapping of option: value.")
        return cls.from_dict({**data, **parse_overrides(overrides)})


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=3e-4", "max_steps=10", "resume=true"]`` -> typed values (YAML scalar rules)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Med3DVLMError(f"Override {item!r} must look like key=value.")
        result[key.strip()] = yaml.safe_load(value)
    return result


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


def trainable_state(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The trained parameters plus all persistent buffers (BatchNorm statistics change too)."""
    state = model.state_dict()
    keep = set(names) | {name for name, _ in model.named_buffers() if name in state}
    return {key: value.detach().cpu().clone().contiguous() for key, value in state.items() if key in keep}


def load_trainable(model: nn.Module, checkpoint_dir: str | Path) -> list[str]:
    """Load ``model.safetensors`` of a checkpoint into ``model``; returns the loaded names."""
    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"Checkpoint weights {path} are missing; point to a folder written by med3dvlm training.")
    state = load_file(str(path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ModelError(f"Checkpoint {path} does not match {type(model).__name__}: {error}") from error
    if result.unexpected_keys:
        raise ModelError(
            f"Checkpoint {path} holds {len(result.unexpected_keys)} tensors that {type(model).__name__} does not have "
            f"(first: {result.unexpected_keys[0]}); it was saved from a different model."
        )
    return sorted(state)


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so torch.load(weights_only=True) can read it back.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _save_checkpoint(directory: Path, model: nn.Module, names: list[str], training: dict[str, Any],
                     info: DistInfo) -> Path:
    """Write into a temporary folder, then swap it in: a crash never leaves half a checkpoint."""
    final, tmp = directory / CHECKPOINT_DIR, directory / (CHECKPOINT_DIR + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng_state_rank{info.rank}.pt")  # every rank has its own RNG streams
    if info.is_main:
        save_file(trainable_state(model, names), str(tmp / "model.safetensors"))
        torch.save(training, tmp / "training_state.pt")
    barrier()
    if info.is_main:
        old = directory / (CHECKPOINT_DIR + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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


def _resume(config: TrainConfig, model: nn.Module, optim: _Optimization, info: DistInfo) -> tuple[int, list[float]]:
    """Restore weights, optimiser, schedule and this rank's RNG streams; returns (step, losses)."""
    folder = Path(config.output_dir) / CHECKPOINT_DIR if config.resume is True else Path(str(config.resume))
    if not (folder / "training_state.pt").is_file():
        raise ModelError(f"Cannot resume: {folder} holds no training_state.pt; train without resume first.")
    load_trainable(model, folder)
    state = torch.load(folder / "training_state.pt", weights_only=True, map_location="cpu")
    optim.load_state_dict(state)
    rng_file = folder / f"rng_state_rank{info.rank}.pt"
    if state["world_size"] == info.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("Resuming with a different number of processes: data order and RNG streams change.")
    logger.info("Resumed from %s at step %d", folder, state["step"])
    return int(state["step"]), list(state["losses"])


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
    step, losses = _resume(config, model, optim, info) if config.resume else (0, [])
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
                with torch.autocast("cuda", dtype=_AMP_DTYPES[config.amp_dtype], enabled=autocast_on):
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
                checkpoint = _save_checkpoint(output_dir, model, names, training, info)
            if step >= total_steps:
                break
    progress.close()
    return TrainResult(losses=losses, steps=step, output_dir=output_dir, checkpoint=checkpoint)
