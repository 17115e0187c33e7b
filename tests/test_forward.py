"""Forward fused sub-layers against torch.nn.functional (conv2d + batch_norm + relu)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn.functional as rbn
from tvm_rbn.ops.reference import bn as ref_bn
from tvm_rbn.ops.reference import conv2d_bn as ref_conv

from conftest import assert_close

# (id, N, C, H, W, K, kernel, stride, padding)
LAYERS = [
    ("1x1", 2, 24, 8, 8, 20, 1, 1, 0),
    ("1x1-stride2", 2, 24, 8, 8, 20, 1, 2, 0),
    ("3x3-pad1", 2, 16, 10, 10, 32, 3, 1, 1),
    ("3x3-stride2", 3, 12, 9, 9, 8, 3, 2, 1),
    ("7x7-stride2-pad3", 1, 3, 17, 17, 10, 7, 2, 3),
    ("odd7x7-batch1", 1, 20, 7, 7, 36, 3, 1, 1),
    ("channels-not-16", 4, 5, 7, 7, 7, 3, 1, 1),
]
LAYER_IDS = [c[0] for c in LAYERS]


def _inputs(case, dtype=torch.float32):
    _, n, c, h, w, k, r, stride, padding = case
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c, r, r, dtype=dtype) / (c * r * r) ** 0.5
    scale = torch.rand(c, dtype=dtype) + 0.5
    shift = torch.randn(c, dtype=dtype) * 0.5
    return x, weight, scale, shift, stride, padding


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_conv2d_stats(case):
    x, weight, _, _, stride, padding = _inputs(case)
    y, tile_sum, tile_m2 = rbn.conv2d_stats(x, weight, stride, padding)
    ref = F.conv2d(x, weight, stride=stride, padding=padding)
    assert_close(y, ref, "conv output")
    ref_sum, ref_m2 = ref_conv.plane_stats(ref.double())
    assert_close(tile_sum, ref_sum.float(), "tile_sum", scale=float(ref.abs().sum() / ref.shape[0]))
    assert_close(tile_m2, ref_m2.float(), "tile_m2", scale=float(ref_m2.abs().max()))


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_plain_conv2d(case):
    x, weight, _, _, stride, padding = _inputs(case)
    assert_close(rbn.conv2d(x, weight, stride, padding), F.conv2d(x, weight, stride=stride, padding=padding),
                 "conv output")


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_bn_relu_conv2d_stats(case, relu):
    """Prologue + conv + epilogue; a negative shift makes padding-after-ReLU matter."""
    x, weight, scale, shift, stride, padding = _inputs(case)
    shift = shift - 1.0
    y, tile_sum, tile_m2 = rbn.bn_relu_conv2d_stats(x, scale, shift, weight, stride, padding, relu=relu)
    ref, ref_sum, ref_m2 = ref_conv.conv2d_fused(x, scale, shift, weight, stride, padding, relu, True)
    a = F.relu(x * scale[:, None, None] + shift[:, None, None]) if relu else x * scale[:, None, None] + shift[:, None, None]
    assert_close(ref, F.conv2d(a, weight, stride=stride, padding=padding), "reference vs torch")
    assert_close(y, ref, "conv output")
    assert_close(tile_sum, ref_sum, "tile_sum", scale=float(ref.abs().sum() / ref.shape[0]))
    assert_close(tile_m2, ref_m2, "tile_m2", scale=float(ref_m2.abs().max()))
    y_only = rbn.bn_relu_conv2d(x, scale, shift, weight, stride, padding, relu=relu)
    assert_close(y_only, ref, "conv output without epilogue")


def test_padding_is_zero_after_relu():
    """relu(shift) > 0 at padded positions would be wrong: the padded activation is 0."""
    x = torch.zeros(1, 2, 4, 4)
    weight = torch.ones(1, 2, 3, 3)
    scale, shift = torch.ones(2), torch.full((2,), 3.0)
    y = rbn.bn_relu_conv2d(x, scale, shift, weight, padding=1)
    # corner output sees a 2x2 window of the image per channel: 2 channels * 4 * 3.0
    assert y[0, 0, 0, 0].item() == pytest.approx(24.0)
    assert y[0, 0, 1, 1].item() == pytest.approx(54.0)


def _bn_module(c, dtype, momentum=0.1, affine=True, track=True):
    bn = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


class RestructuredChain:
    """conv1 -> BN -> ReLU -> conv2 (-> stats for the next BN), on the functional kernels."""

    def __init__(self, conv1: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, conv2: torch.nn.Conv2d):
        self.conv1, self.bn, self.conv2 = conv1, bn, conv2

    @torch.no_grad()
    def __call__(self, x):
        c1, bn, c2 = self.conv1, self.bn, self.conv2
        y1, s, m2 = rbn.conv2d_stats(x, c1.weight, c1.stride, c1.padding)
        if bn.training or bn.running_mean is None:
            coeffs = rbn.bn_finalize(
                s, m2, rbn.tile_count(y1), bn.weight, bn.bias,
                bn.running_mean if bn.training else None, bn.running_var if bn.training else None,
                bn.num_batches_tracked if bn.training else None, momentum=bn.momentum, eps=bn.eps,
            )
            scale, shift = coeffs.scale, coeffs.shift
        else:
            scale, shift = rbn.bn_eval_coefficients(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        return rbn.bn_relu_conv2d_stats(y1, scale, shift, c2.weight, c2.stride, c2.padding)


BN_VARIANTS = [
    ("momentum-0.1", dict(momentum=0.1)),
    ("momentum-None", dict(momentum=None)),
    ("no-affine", dict(affine=False)),
    ("no-running-stats", dict(track=False)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", [v[1] for v in BN_VARIANTS], ids=[v[0] for v in BN_VARIANTS])
def test_chain_training_then_eval(variant, dtype):
    """Three training calls (running statistics), then eval, against nn modules."""
    conv1 = torch.nn.Conv2d(6, 20, 3, padding=1, bias=False).to(dtype)
    conv2 = torch.nn.Conv2d(20, 12, 3, stride=2, padding=1, bias=False).to(dtype)
    bn = _bn_module(20, dtype, **variant)
    ours_bn = _bn_module(20, dtype, **variant)
    ours_bn.load_state_dict(bn.state_dict())
    chain = RestructuredChain(conv1, ours_bn, conv2)
    for step in range(3):
        x = torch.randn(3, 6, 11, 11, dtype=dtype) * (step + 1) + step
        with torch.no_grad():
            ref = conv2(F.relu(bn(conv1(x))))
        y, tile_sum, _ = chain(x)
        assert_close(y, ref, f"step {step}: conv2 output")
        assert_close(tile_sum, ref.sum((2, 3)), f"step {step}: next BN's tile sums", scale=float(ref.abs().sum() / 3))
        if bn.track_running_stats:
            assert_close(ours_bn.running_mean, bn.running_mean, f"step {step}: running_mean")
            assert_close(ours_bn.running_var, bn.running_var, f"step {step}: running_var")
            assert ours_bn.num_batches_tracked.item() == bn.num_batches_tracked.item()
    bn.eval()
    ours_bn.eval()
    x = torch.randn(2, 6, 11, 11, dtype=dtype)
    with torch.no_grad():
        ref = conv2(F.relu(bn(conv1(x))))
    assert_close(chain(x)[0], ref, "eval conv2 output")


def test_ill_conditioned_statistics():
    """|mean| = 1000 * std: the naive E[x^2] - E[x]^2 in fp32 loses the variance entirely."""
    n, c, h, w = 4, 8, 14, 14
    x = 1000.0 + torch.randn(n, c, h, w)
    identity = torch.eye(c).reshape(c, c, 1, 1)
    y, tile_sum, tile_m2 = rbn.conv2d_stats(x, identity)
    assert torch.equal(y, x)
    bn = _bn_module(c, torch.float32)
    ours = _bn_module(c, torch.float32)
    ours.load_state_dict(bn.state_dict())
    coeffs = rbn.bn_finalize(tile_sum, tile_m2, h * w, ours.weight.detach(), ours.bias.detach(),
                             ours.running_mean, ours.running_var, ours.num_batches_tracked, momentum=0.1)
    truth = x.double()
    var = truth.var(dim=(0, 2, 3), unbiased=False)
    invstd = (var + 1e-5).rsqrt()
    rel = ((coeffs.invstd.double() - invstd).abs() / invstd).max().item()
    assert rel < 1e-4, f"invstd relative error {rel:.2e}"
    with torch.no_grad():
        ref_out = bn(x)
    out = rbn.bn_relu(y, coeffs.scale, coeffs.shift, relu=False)
    assert_close(out, ref_out, "normalized output", scale=1.0 / 1e-2)  # fp32 inputs carry 6e-5 absolute error
    assert_close(ours.running_var, bn.running_var, "running_var")


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
def test_standalone_apply_and_stats(relu):
    x = torch.randn(2, 10, 5, 9)
    scale, shift = torch.randn(10), torch.randn(10)
    assert_close(rbn.bn_relu(x, scale, shift, relu=relu), ref_bn.apply(x, scale, shift, relu), "apply")
    tile_sum, tile_m2 = rbn.batch_stats(x)
    ref_sum, ref_m2 = ref_bn.tile_stats(x)
    assert_close(tile_sum, ref_sum, "tile_sum", scale=45.0)
    assert_close(tile_m2, ref_m2, "tile_m2", scale=45.0)


def test_finalize_matches_reference_and_torch():
    tiles, c, count = 5, 7, 13
    y = torch.randn(tiles, c, count, dtype=torch.float64) * 3 + 2
    tile_sum = y.sum(2)
    tile_m2 = ((y - y.mean(2, keepdim=True)) ** 2).sum(2)
    gamma, beta = torch.rand(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    expected = ref_bn.finalize(tile_sum, tile_m2, count, gamma, beta, rm, rv, 1e-3, 0.25)
    got = rbn.bn_finalize(tile_sum, tile_m2, count, gamma, beta, rm.clone(), rv.clone(), momentum=0.25, eps=1e-3)
    for name, a, b in zip(("scale", "shift", "mean", "invstd"), got, expected):
        assert_close(a, b, name)
    flat = y.permute(1, 0, 2).reshape(c, -1)
    assert_close(expected[2], flat.mean(1), "reference mean")
    assert_close(expected[5], 0.75 * rv + 0.25 * flat.var(1, unbiased=True), "reference running_var")
