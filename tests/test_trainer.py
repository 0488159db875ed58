"""The generic training loop on a tiny real model: learning, exact resume, freezing, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from med3dvlm.errors import Med3DVLMError, ModelError
from med3dvlm.train import TrainConfig, load_trainable, parse_overrides, seed_everything, train
from med3dvlm.train.trainer import lr_lambda


class NoisyRegression(Dataset):
    """y = x @ w; NumPy noise in __getitem__ so resuming must restore NumPy's RNG too."""

    def __init__(self, n: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        noise = torch.from_numpy(np.random.normal(0, 0.01, size=1).astype(np.float32))
        return {"x": self.x[i], "y": self.y[i] + noise}


class TinyNet(nn.Module):
    """Dropout (torch RNG) and BatchNorm (buffers) make resume exactness a real check."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.head(self.encoder(x))
        return {"loss": nn.functional.mse_loss(pred, y), "pred": pred}


def make_model() -> TinyNet:
    seed_everything(123)
    return TinyNet()


def config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / name), seed=7, max_steps=6, batch_size=2, grad_accum=2, lr=1e-2,
                warmup_steps=2, weight_decay=0.01, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def eval_loss(model: TinyNet, data: NoisyRegression) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(data.x, data.y)["loss"])


def test_training_reduces_loss_and_writes_run_files(tmp_path):
    model, data = make_model(), NoisyRegression()
    before = eval_loss(model, data)
    cfg = config(tmp_path, "run", max_steps=None, epochs=15, lr=3e-2, grad_accum=1)
    result = train(model, data, cfg)
    assert result.steps == 15 * 4  # 8 samples / batch 2 = 4 steps per epoch
    assert eval_loss(model, data) < 0.5 * before
    out = tmp_path / "run"
    assert TrainConfig.from_file(out / "run_config.json") == cfg
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert [r["lr"] for r in log[:3]] == pytest.approx([0.015, 0.03, 0.03])  # 2 warm-up steps, then cosine
    assert result.checkpoint == out / "checkpoint-last"
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert "encoder.1.running_mean" in saved  # BatchNorm statistics travel with the weights
    assert torch.equal(saved["head.weight"], model.head.weight.detach())


def test_resume_after_interruption_is_exact(tmp_path):
    straight = make_model()
    full = train(straight, NoisyRegression(), config(tmp_path, "straight"))

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] > 6:  # 3 steps x 2 micro-batches, then the "machine dies"
            raise RuntimeError("simulated preemption")
        return model(**batch)

    interrupted = make_model()
    with pytest.raises(RuntimeError, match="preemption"):
        train(interrupted, NoisyRegression(), config(tmp_path, "split", save_every=3), loss_fn=crashing_loss)
    state = torch.load(tmp_path / "split/checkpoint-last/training_state.pt", weights_only=True)
    assert state["step"] == 3

    resumed_model = make_model()  # fresh process: weights come only from the checkpoint
    resumed = train(resumed_model, NoisyRegression(), config(tmp_path, "split", save_every=3, resume=True))
    assert resumed.steps == 6
    assert resumed.losses == full.losses
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_trainable_prefix_freezes_the_rest(tmp_path):
    model = make_model()
    encoder_before = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
    head_before = model.head.weight.detach().clone()
    result = train(model, NoisyRegression(), config(tmp_path, "frozen", max_steps=3), trainable="head")
    for key, value in encoder_before.items():
        assert torch.equal(dict(model.encoder.named_parameters())[key], value), key
    assert not torch.equal(model.head.weight, head_before)
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert {k for k in saved if "weight" in k or "bias" in k} - {"encoder.1.weight", "encoder.1.bias"} == {
        "head.weight", "head.bias"}
    assert "encoder.0.weight" not in saved

    with pytest.raises(ModelError, match="no parameters under"):
        train(make_model(), NoisyRegression(), config(tmp_path, "typo", max_steps=1), trainable=["haed"])

    other = make_model()
    assert load_trainable(other, result.checkpoint)
    assert torch.equal(other.head.weight, model.head.weight)


def test_loss_fn_and_tuple_batches(tmp_path):
    data = [(torch.randn(3), torch.tensor(1.0)) for _ in range(4)]
    model = nn.Linear(3, 1)

    def loss_fn(m, batch):
        x, y = batch
        return nn.functional.mse_loss(m(x).squeeze(-1), y)

    result = train(model, data, config(tmp_path, "fn", max_steps=2, grad_accum=1), loss_fn=loss_fn)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


def test_model_without_loss_gives_clear_error(tmp_path):
    data = [{"input": torch.randn(3)} for _ in range(4)]
    with pytest.raises(ModelError, match="loss"):
        train(nn.Linear(3, 1), data, config(tmp_path, "noloss", max_steps=1), loss_fn=lambda m, b: m(b["input"]))


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelError, match="Cannot resume"):
        train(make_model(), NoisyRegression(), config(tmp_path, "none", resume=True))


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(warmup_steps=2, min_lr_ratio=0.1)
    f = lr_lambda(cfg, total_steps=12)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(12) == pytest.approx(0.1)
    assert lr_lambda(TrainConfig(schedule="constant"), 12)(9) == 1.0


def test_config_files_and_overrides(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("output_dir: out\nlr: 1e-4\nbetas: [0.9, 0.95]\nmax_steps: 5\n")
    cfg = TrainConfig.from_file(yaml_file, ["max_steps=9", "resume=true"])
    assert (cfg.lr, cfg.betas, cfg.max_steps, cfg.resume) == (1e-4, (0.9, 0.95), 9, True)
    json_file = tmp_path / "cfg.json"
    cfg.save(json_file)
    assert TrainConfig.from_file(json_file) == cfg
    assert parse_overrides(["grad_clip=null"]) == {"grad_clip": None}
    with pytest.raises(Med3DVLMError, match="Unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(Med3DVLMError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(Med3DVLMError, match="key=value"):
        parse_overrides(["lr"])
