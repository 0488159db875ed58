"""DCFormer encoder: shapes, token order, decomposed convolution maths, released sizes and keys."""

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.errors import ModelError
from med3dvlm.models.dcformer import (
    PRESETS,
    DCFormer,
    DCFormerConfig,
    DecomposedConv3d,
    stage_tokens,
)

SMALL_INPUT = (32, 64, 64)  # (D, H, W)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_feature_maps_and_token_shapes(name):
    torch.manual_seed(0)
    model = DCFormer(DCFormerConfig.preset(name, SMALL_INPUT)).eval()
    with torch.no_grad():
        maps = model(torch.rand(1, 1, *SMALL_INPUT))
    channels = PRESETS[name][1]
    # Stem divides by 4, each later stage by 2; maps keep the input's (D, H, W) axis order.
    expected = [(8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2), (1, 1, 1)]
    assert [tuple(m.shape) for m in maps] == [(1, c, *s) for c, s in zip(channels, expected)]
    tokens = [tuple(stage_tokens(m).shape[1:]) for m in maps]
    assert tokens == model.token_shapes() == model.config.token_shapes(SMALL_INPUT)
    assert all(torch.isfinite(m).all() for m in maps)


def test_token_shapes_for_odd_sizes_match_forward():
    model = DCFormer(DCFormerConfig.preset("nano")).eval()
    size = (9, 17, 30)
    with torch.no_grad():
        maps = model(torch.rand(1, 1, *size))
    assert [tuple(stage_tokens(m).shape[1:]) for m in maps] == model.token_shapes(size)


def test_released_input_gives_projector_token_shapes():
    shapes = DCFormerConfig.preset("small").token_shapes()  # (128, 256, 256)
    assert shapes[-2:] == [(256, 384), (32, 768)]


def test_stage_tokens_are_in_d_h_w_order():
    fm = torch.arange(2 * 3 * 2 * 4 * 5, dtype=torch.float32).reshape(2, 3, 2, 4, 5)
    tokens = stage_tokens(fm)
    assert tokens.shape == (2, 2 * 4 * 5, 3)
    d, h, w = 1, 2, 3
    assert torch.equal(tokens[:, d * 4 * 5 + h * 5 + w], fm[:, :, d, h, w])


def _dense_equivalent(conv: DecomposedConv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold each branch's eval-mode BatchNorm (a per-channel affine map) into its conv and place
    the three 1D kernels on the axes through the centre of one k x k x k kernel."""
    weights, bias = [], 0.0
    for axis, branch in enumerate((conv.c1, conv.c2, conv.c3)):
        c, bn = branch[0], branch[1]
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weights.append(c.weight * gain[:, None, None, None, None])
        bias = bias + (c.bias - bn.running_mean) * gain + bn.bias
    k = max(weights[0].shape[2:])
    dense = torch.zeros(*weights[0].shape[:2], k, k, k)
    dense[:, :, :, k // 2, k // 2] += weights[0][:, :, :, 0, 0]
    dense[:, :, k // 2, :, k // 2] += weights[1][:, :, 0, :, 0]
    dense[:, :, k // 2, k // 2, :] += weights[2][:, :, 0, 0, :]
    return dense, bias


@pytest.mark.parametrize(
    "in_ch,out_ch,k,stride,groups",
    [(6, 6, 5, 1, 6), (1, 4, 7, 4, 1)],  # depthwise block conv; strided stem conv
)
def test_decomposed_conv_equals_one_dense_conv_in_eval_mode(in_ch, out_ch, k, stride, groups):
    # True in eval mode only: BatchNorm with running statistics is a fixed affine map per
    # channel; in training mode each branch is normalised by its own batch statistics.
    torch.manual_seed(0)
    conv = DecomposedConv3d(in_ch, out_ch, k, stride=stride, groups=groups)
    for branch in (conv.c1, conv.c2, conv.c3):
        bn = branch[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    conv.eval()
    x = torch.randn(2, in_ch, 9, 10, 11)
    weight, bias = _dense_equivalent(conv)
    with torch.no_grad():
        expected = F.conv3d(x, weight, bias, stride=stride, padding=k // 2, groups=groups)
        actual = conv(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_small_parameter_count_and_official_keys():
    with torch.device("meta"):  # counts only: nothing is allocated or run
        model = DCFormer(DCFormerConfig.preset("small", (128, 256, 256)))
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 18_274_035  # BatchNorm buffers included
    assert len(state) == 426
    for key in (
        "encoder.s0.0.0.c1.0.weight",
        "encoder.s0.0.3.c3.1.running_var",
        "encoder.s1.0.proj.weight",
        "encoder.s1.0.dwconv.c2.0.bias",
        "encoder.s3.5.scale",
        "encoder.s4.1.mlp.mlp.0.weight",
        "encoder.s4.1.mlp.mlp.3.bias",
    ):
        assert key in state, key
    assert state["encoder.s1.0.dwconv.c1.0.weight"].shape == (96, 1, 13, 1, 1)
    assert state["encoder.s4.0.dwconv.c3.0.weight"].shape == (768, 1, 1, 1, 7)
    assert "encoder.s1.1.proj.weight" not in state  # only a stage's first block downsamples


def test_layer_scale_starts_small_so_blocks_start_near_identity():
    block_scales = [p for n, p in DCFormer(DCFormerConfig.preset("nano")).named_parameters() if n.endswith("scale")]
    assert len(block_scales) == 4 and all(torch.all(s == 1e-6) for s in block_scales)


def test_bad_input_and_config_raise_model_error():
    model = DCFormer(DCFormerConfig.preset("nano"))
    with pytest.raises(ModelError, match="expects images"):
        model(torch.rand(1, 32, 32, 32))
    with pytest.raises(ModelError, match="Unknown DCFormer variant"):
        DCFormerConfig.preset("huge")
    with pytest.raises(ModelError, match="stem"):
        DCFormerConfig(num_blocks=(2, 1, 1, 1, 1))


def test_config_round_trips_through_json_lists():
    import json
    from dataclasses import asdict

    config = DCFormerConfig.preset("tiny", (64, 128, 128))
    assert DCFormerConfig(**json.loads(json.dumps(asdict(config)))) == config
