"""Dual-stream MLP-Mixer projector: released size, keys, computation, stream order, errors."""

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.models.projector import MixerProjector, ProjectorConfig


def test_released_projector_size_and_keys():
    with torch.device("meta"):  # ~190 MB in fp32: count without allocating
        projector = MixerProjector(ProjectorConfig(hidden_size=3584))
    assert sum(p.numel() for p in projector.parameters()) == 47_221_248
    assert projector.num_tokens == 256
    state = projector.state_dict()
    assert len(state) == 48
    for key in (
        "low_mixer.0.ln1.weight",
        "low_mixer.1.ln2.bias",
        "low_mixer.0.mlp1.mm_projector.0.weight",
        "high_mixer.1.mlp1.mm_projector.1.1.weight",
        "high_mixer.0.mlp2.mm_projector.1.1.bias",
    ):
        assert key in state, key
    assert state["low_mixer.0.mlp2.mm_projector.0.weight"].shape == (1792, 384)
    assert state["high_mixer.1.mlp2.mm_projector.1.1.weight"].shape == (3584, 3584)


def test_forward_shape_and_config_from_encoder():
    config = ProjectorConfig.for_encoder(DCFormerConfig.preset("small"), hidden_size=64)
    assert (config.low_input_size, config.high_input_size) == ((256, 384), (32, 768))
    assert config.stream_sizes("low") == [((256, 384), (192, 32)), ((192, 32), (128, 64))]
    assert config.stream_sizes("high") == [((32, 768), (64, 32)), ((64, 32), (128, 64))]
    projector = MixerProjector(config)
    out = projector(torch.randn(2, 256, 384), torch.randn(2, 32, 768))
    assert out.shape == (2, projector.num_tokens, 64) == (2, 256, 64)


def test_mixer_layer_computes_ln_token_mlp_ln_channel_mlp_without_residuals():
    torch.manual_seed(0)
    config = ProjectorConfig((6, 8), (4, 8), (5,), (3,), hidden_size=10, depth=1)
    projector = MixerProjector(config)
    layer = projector.low_mixer[0]
    for p in layer.parameters():  # non-trivial LayerNorm affine too
        p.data.normal_()
    x = torch.randn(2, 6, 8)

    def mlp(v, mod):
        first, second = mod.mm_projector[0], mod.mm_projector[1][1]
        return F.linear(F.gelu(F.linear(v, first.weight, first.bias)), second.weight, second.bias)

    y = F.layer_norm(x, (8,), layer.ln1.weight, layer.ln1.bias)
    y = mlp(y.transpose(1, 2), layer.mlp1).transpose(1, 2)  # mix tokens: (2, 5, 8)
    y = mlp(F.layer_norm(y, (8,), layer.ln2.weight, layer.ln2.bias), layer.mlp2)  # mix channels
    torch.testing.assert_close(layer(x), y)
    assert y.shape == (2, 5, 10)


def test_low_stream_comes_first():
    torch.manual_seed(0)
    projector = MixerProjector(ProjectorConfig((6, 8), (4, 12), (5, 3), (2, 2), hidden_size=16))
    low, high = torch.randn(1, 6, 8), torch.randn(1, 4, 12)
    out = projector(low, high)
    out_new_high = projector(low, torch.randn(1, 4, 12))
    assert out.shape == (1, 5, 16)
    torch.testing.assert_close(out[:, :3], out_new_high[:, :3])  # low tokens untouched
    assert not torch.allclose(out[:, 3:], out_new_high[:, 3:])


def test_errors_name_the_problem():
    projector = MixerProjector(ProjectorConfig(hidden_size=16))
    with pytest.raises(ModelError, match="low stream expects"):
        projector(torch.randn(1, 255, 384), torch.randn(1, 32, 768))
    with pytest.raises(ModelError, match="divisible"):
        ProjectorConfig(hidden_size=18)
    with pytest.raises(ModelError, match="token counts"):
        ProjectorConfig(low_output_size=(192, 128, 64))
