"""The residual-branch end, relu(bn(y) + identity) and relu(bn(y) + bn2(y2)): kernels against
their references and torch autograd, and restructured ResNet blocks against PyTorch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn
import tvm_rbn.functional as rbn
from tvm_rbn.build import provider
from tvm_rbn.build.workloads import extract
from tvm_rbn.models.resnet import Bottleneck
from tvm_rbn.ops.reference import residual as ref

from conftest import assert_close

DTYPES = [torch.float32, torch.float64]


def _coeffs(c, dtype):
    invstd = torch.rand(c, dtype=dtype) + 0.5
    return rbn.BNCoefficients(invstd * (torch.rand(c, dtype=dtype) + 0.5), torch.randn(c, dtype=dtype) - 0.3,
                              torch.randn(c, dtype=dtype), invstd)


@pytest.mark.parametrize("shape", [(3, 10, 5, 7), (4, 10, 1, 1)], ids=["5x7", "1x1-planes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("second_bn", [False, True], ids=["identity", "projection-bn"])
def test_kernels_match_reference(second_bn, dtype, shape):
    y, other = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    co, co2 = _coeffs(10, dtype), _coeffs(10, dtype)
    if second_bn:
        a = rbn.bn_add_relu(y, co.scale, co.shift, y2=other, scale2=co2.scale, shift2=co2.shift)
        expected = ref.bn_add_relu(y, co.scale, co.shift, y2=other, scale2=co2.scale, shift2=co2.shift)
    else:
        a = rbn.bn_add_relu(y, co.scale, co.shift, other)
        expected = ref.bn_add_relu(y, co.scale, co.shift, other)
    assert bool((expected == 0).any()) and bool((expected > 0).any()), "the data must exercise the ReLU"
    assert_close(a, expected, "a")
    da = torch.randn(shape, dtype=dtype)
    if second_bn:
        got = rbn.bn_add_relu_backward(da, a, y, co, other, co2)
        want = ref.bn_add_relu_backward(da, a, y, co.mean, co.invstd, co.scale, other, co2.mean, co2.invstd,
                                        co2.scale)
    else:
        got = rbn.bn_add_relu_backward(da, a, y, co)
        want = ref.bn_add_relu_backward(da, a, y, co.mean, co.invstd, co.scale)
    names = ["grad_y", "grad_other", "tile_dbeta", "tile_dgamma", "tile_dgamma2"]
    for name, g, w in zip(names, got, want):
        assert_close(g, w, name, scale=35.0 * 4 if name.startswith("tile") else None)


def test_reference_backward_is_autograd():
    dtype = torch.float64
    shape = (2, 6, 4, 5)
    y, y2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 2 + 1
    g1, b1 = (torch.rand(6, dtype=dtype) + 0.5).requires_grad_(), torch.randn(6, dtype=dtype).requires_grad_()
    g2, b2 = (torch.rand(6, dtype=dtype) + 0.5).requires_grad_(), torch.randn(6, dtype=dtype).requires_grad_()
    yl, y2l = y.clone().requires_grad_(), y2.clone().requires_grad_()
    a = torch.relu(F.batch_norm(yl, None, None, g1, b1, training=True) + F.batch_norm(y2l, None, None, g2, b2,
                                                                                        training=True))
    da = torch.randn_like(a)
    a.backward(da)
    stats = [(t.mean((0, 2, 3)), (t.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()) for t in (y, y2)]
    gy, gy2, tb, tg, tg2 = ref.bn_add_relu_backward(da, a.detach(), y, *stats[0], g1.detach() * stats[0][1], y2,
                                                    *stats[1], g2.detach() * stats[1][1])
    assert_close(tg.sum(0), g1.grad, "dgamma1")
    assert_close(tb.sum(0), b1.grad, "dbeta1")
    assert_close(tg2.sum(0), g2.grad, "dgamma2")
    assert_close(tb.sum(0), b2.grad, "dbeta2")


class Stem(torch.nn.Module):
    """conv-BN-ReLU then two residual blocks: identity shortcut, then projection shortcut."""

    def __init__(self, block):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.block1 = block(16, 16 // block.expansion)
        self.block2 = block(16, 8, stride=2)
        self.fc = torch.nn.Linear(8 * block.expansion, 5)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def test_resnet_blocks_train_like_pytorch_fp64():
    """Bottleneck blocks with both shortcut kinds (BasicBlock: resnet18/34 in
    test_model_training), three SGD steps, then eval mode with an input gradient."""
    block = Bottleneck
    torch.manual_seed(0)
    ref_model = Stem(block).double()
    model = tvm_rbn.restructure(copy.deepcopy(ref_model))
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert "add+ReLU kernel with the identity" in rows["block1.bn3"].apply
    last = "bn3"
    assert rows[f"block2.{last}"].apply == "add+ReLU kernel with block2.downsample.1 (one pass)"
    assert rows["block2.downsample.1"].apply == f"add+ReLU kernel with block2.{last} (one pass)"
    provider.prepare([spec for spec, _ in extract(ref_model, (4, 3, 8, 8), dtype=torch.float64)])  # one build
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref_model)]
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        t = torch.randint(0, 5, (4,), generator=g)
        for m, opt in zip((model, ref_model), opts):
            loss = F.cross_entropy(m(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step == 0:
            for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
                assert_close(p.grad, q.grad, f"step 0: gradient of {name}")
    for key, value in ref_model.state_dict().items():
        assert_close(model.state_dict()[key].double(), value.double(), f"after 3 steps: {key}")
    model.eval(), ref_model.eval()
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out, ref_out = model(x), ref_model(xr)
    assert_close(out, ref_out, "eval output")
    out.sum().backward(), ref_out.sum().backward()
    assert_close(x.grad, xr.grad, "eval-mode input gradient")
