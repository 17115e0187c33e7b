"""BatchNorm(+ReLU) fused into the pool that reads it: the max pool of a ResNet/DenseNet stem or a
VGG block (kernels against PyTorch's, ties included; restructured stems against the unchanged
model) and the average pool of a DenseNet transition, whose 1x1 conv moves after the pool."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tvm_rbn
import tvm_rbn.functional as rbn
from tvm_rbn._checks import InputError
from tvm_rbn.ops.reference import pool as ref

from conftest import assert_close

# (id, input shape, kernel, stride, padding)
GEOMETRIES = [
    ("stem-3x3-s2-p1", (2, 5, 12, 11), (3, 3), (2, 2), (1, 1)),
    ("vgg-2x2-s2", (2, 4, 8, 8), (2, 2), (2, 2), (0, 0)),
    ("3x2-s1x2-p1x0", (1, 3, 7, 9), (3, 2), (1, 2), (1, 0)),
]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _inputs(shape, dtype, seed=0):
    """Values on a 1/4 grid, scales powers of two, shifts on the grid: every BN output is exact
    in both dtypes, so windows hold exact ties (many, after the ReLU) and the first-maximum
    rule is checked bit for bit."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    y = torch.randint(-8, 9, shape, generator=g).to(dtype) / 4
    scale = 2.0 ** torch.randint(-1, 2, (c,), generator=g).to(dtype)
    scale[0] = -scale[0]  # a negative gamma: the maximum of z is not at the maximum of y
    shift = torch.randint(-4, 5, (c,), generator=g).to(dtype) / 4
    mean, invstd = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    return y, rbn.BNCoefficients(scale, shift, mean, invstd)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_kernels_match_pytorch_max_pool(geometry, relu, dtype):
    _, shape, kernel, stride, padding = geometry
    y, co = _inputs(shape, dtype)
    pooled, tap = rbn.bn_relu_maxpool(y, co.scale, co.shift, kernel, stride, padding, relu)
    ref_pooled, ref_tap = ref.bn_relu_maxpool(y, co.scale, co.shift, relu, kernel, stride, padding)
    assert torch.equal(pooled, ref_pooled), (pooled - ref_pooled).abs().max()
    assert torch.equal(tap, ref_tap), f"{int((tap != ref_tap).sum())} windows pick another maximum"
    dpool = torch.randn(pooled.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = rbn.bn_relu_maxpool_backward(dpool, tap, y, co, kernel, stride, padding, relu)
    expected = ref.bn_relu_maxpool_backward(dpool, y, co.scale, co.shift, co.mean, co.invstd, relu, kernel, stride,
                                            padding)
    for name, a, b in zip(("grad_y", "tile_dbeta", "tile_dgamma"), got, expected):
        assert_close(a, b, name, scale=max(1.0, float(dpool.abs().sum() / (shape[0] * shape[1]))))


def test_bad_pool_arguments_are_named():
    y, co = _inputs((1, 2, 6, 6), torch.float32)
    with pytest.raises(InputError, match="padding"):
        rbn.bn_relu_maxpool(y, co.scale, co.shift, 2, 2, 2)
    pooled, tap = rbn.bn_relu_maxpool(y, co.scale, co.shift, 3, 2, 1)
    with pytest.raises(InputError, match="dpool"):
        rbn.bn_relu_maxpool_backward(pooled[:, :, 1:], tap, y, co, 3, 2, 1)
    with pytest.raises(InputError, match="int32"):
        rbn.bn_relu_maxpool_backward(pooled, tap.long(), y, co, 3, 2, 1)


class Stem(nn.Module):
    def __init__(self, pool: nn.MaxPool2d, relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.use_relu = relu
        self.maxpool = pool
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        with torch.no_grad():
            self.bn1.weight.uniform_(-1.5, 1.5)  # negative scales too
            self.bn1.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        a = self.bn1(self.conv1(x))
        if self.use_relu:
            a = torch.relu(a)
        return torch.relu(self.bn2(self.conv2(self.maxpool(a))))


POOLS = {
    "3x3-s2-p1": (nn.MaxPool2d(3, 2, 1), True, "max-pool kernel of maxpool"),
    "2x2-no-relu": (nn.MaxPool2d(2), False, "max-pool kernel of maxpool"),
    "ceil-mode-left-in-pytorch": (nn.MaxPool2d(3, 2, 1, ceil_mode=True), True, "standalone for maxpool"),
    "dilation-left-in-pytorch": (nn.MaxPool2d(2, 1, dilation=2), True, "standalone for maxpool"),
}


def _train_against_pytorch(model, ref_model, x):
    """Two training steps of both models: outputs, every gradient, the running statistics."""
    for step in range(2):
        outs = []
        for m in (model, ref_model):
            m.zero_grad()
            out = m(x + step)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
            outs.append(out)
        assert_close(outs[0], outs[1], f"step {step}: output")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_close(p.grad, q.grad, f"step {step}: gradient of {name}", scale=max(1.0, float(q.grad.abs().max())))
    for key, value in ref_model.state_dict().items():
        assert_close(model.state_dict()[key].double(), value.double(), f"running statistics: {key}")


def _compiled_against_pytorch(ref_model, bn_name: str):
    """The restructured model under torch.compile: output and the BatchNorm's gamma gradient."""
    model = torch.compile(tvm_rbn.restructure(copy.deepcopy(ref_model)))
    x = torch.randn(2, 3, 16, 16)
    out, ref_out = model(x), ref_model(x)
    out.sum().backward()
    ref_out.sum().backward()
    assert_close(out, ref_out, "output under torch.compile")
    grad, ref_grad = (m.get_submodule(bn_name).weight.grad for m in (model, ref_model))
    assert_close(grad, ref_grad, f"{bn_name}'s gamma gradient", scale=max(1.0, float(ref_grad.abs().max())))


@pytest.mark.parametrize("pool", POOLS, ids=list(POOLS))
def test_restructured_stem_matches_pytorch_fp64(pool):
    module, relu, apply = POOLS[pool]
    torch.manual_seed(0)
    ref_model = Stem(copy.deepcopy(module), relu).double().train()
    model = tvm_rbn.restructure(copy.deepcopy(ref_model))
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert rows["bn1"].apply.startswith(apply), rows["bn1"]
    _train_against_pytorch(model, ref_model, torch.randn(3, 3, 15, 17, dtype=torch.float64))


def test_fused_pool_runs_under_torch_compile():
    torch.manual_seed(0)
    _compiled_against_pytorch(Stem(nn.MaxPool2d(3, 2, 1)).train(), "bn1")


# (id, input shape, window): non-overlapping windows; odd planes lose their last rows/columns
AVG_GEOMETRIES = [
    ("2x2", (2, 5, 8, 8), (2, 2)),
    ("2x2-odd-plane", (2, 3, 7, 9), (2, 2)),
    ("3x2", (1, 3, 9, 7), (3, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("geometry", AVG_GEOMETRIES, ids=[g[0] for g in AVG_GEOMETRIES])
def test_kernels_match_pytorch_avg_pool(geometry, relu, dtype):
    _, shape, window = geometry
    y, co = _inputs(shape, dtype)
    pooled = rbn.bn_relu_avgpool(y, co.scale, co.shift, window, relu)
    expected = ref.bn_relu_avgpool(y, co.scale, co.shift, relu, window)
    if window == (2, 2):  # grid values, a power-of-two divisor: exact either way
        assert torch.equal(pooled, expected), (pooled - expected).abs().max()
    assert_close(pooled, expected, "pooled")
    dpool = torch.randn(pooled.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = rbn.bn_relu_avgpool_backward(dpool, y, co, window, relu)
    expected = ref.bn_relu_avgpool_backward(dpool, y, co.scale, co.shift, co.mean, co.invstd, relu, window)
    for name, a, b in zip(("grad_y", "tile_dbeta", "tile_dgamma"), got, expected):
        assert_close(a, b, name, scale=max(1.0, float(dpool.abs().sum() / (shape[0] * shape[1]))))


def test_bad_avg_pool_arguments_are_named():
    y, co = _inputs((1, 2, 3, 6), torch.float32)
    with pytest.raises(InputError, match="larger than the input"):
        rbn.bn_relu_avgpool(y, co.scale, co.shift, 4)
    pooled = rbn.bn_relu_avgpool(y, co.scale, co.shift, 2)
    with pytest.raises(InputError, match="dpool"):
        rbn.bn_relu_avgpool_backward(pooled[:, :, :, 1:], y, co, 2)


class Transition(nn.Module):
    """A dense block's end and a transition: conv, BN, ReLU, conv, pool, then a BN that reads
    the pooled conv output (its statistics check the commuted conv's output)."""

    def __init__(self, conv: nn.Conv2d | None, pool: nn.Module):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.conv = conv or (lambda a: a)  # None: the pool reads the activation
        self.pool = pool
        self.norm_next = nn.BatchNorm2d(conv.out_channels if conv else 8)
        with torch.no_grad():
            self.norm.weight.uniform_(-1.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm_next(self.pool(self.conv(torch.relu(self.norm(self.conv0(x))))))


TRANSITIONS = {
    "1x1-2x2": (nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(2),
                "average-pool kernel of pool (one pass; conv moved after it, ours)"),
    "1x1-bias-3x3": (nn.Conv2d(8, 4, 1), nn.AvgPool2d(3),
                     "average-pool kernel of pool (one pass; conv moved after it, ours)"),
    "1x1-groups-moved-kept": (nn.Conv2d(8, 4, 1, groups=2, bias=False), nn.AvgPool2d(2),
                              "average-pool kernel of pool (one pass; conv moved after it, PyTorch's)"),
    "3x3-conv-kept": (nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.AvgPool2d(2), "prologue of conv"),
    "overlapping-pool-kept": (nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(3, 2), "prologue of conv"),
    "padded-pool-kept": (nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(2, padding=1), "prologue of conv"),
    "pool-alone": (None, nn.AvgPool2d(2), "average-pool kernel of pool (one pass)"),
}


@pytest.mark.parametrize("case", TRANSITIONS, ids=list(TRANSITIONS))
def test_restructured_transition_matches_pytorch_fp64(case):
    conv, pool, apply = TRANSITIONS[case]
    torch.manual_seed(0)
    ref_model = Transition(copy.deepcopy(conv), copy.deepcopy(pool)).double().train()
    model = tvm_rbn.restructure(copy.deepcopy(ref_model))
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert rows["norm"].apply.startswith(apply) and rows["norm"].fused == "full", rows["norm"]
    _train_against_pytorch(model, ref_model, torch.randn(3, 3, 13, 12, dtype=torch.float64))


def test_fused_avg_pool_runs_under_torch_compile():
    torch.manual_seed(0)
    _compiled_against_pytorch(Transition(nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(2)).train(), "norm")
