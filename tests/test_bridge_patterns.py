"""restructure() on the patterns where chains end: biased convs before BatchNorms, BatchNorms
followed by something other than a ReLU (another BatchNorm, a pool, the model output), in fp64
against the unchanged model: outputs, every gradient, running statistics, train and eval."""
from __future__ import annotations

import copy

import torch
from torch import nn

import tvm_rbn

from conftest import assert_close


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class BiasAndEnds(nn.Module):
    """conv(bias)-BN-ReLU-conv(bias)-BN (no ReLU) -> BN -> ReLU -> conv(bias, no BN after) ->
    pool -> BN -> pool; the second BN's output is also a model output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = _bn(8)
        self.bn3 = _bn(8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.bn4 = _bn(6)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3):
                conv.bias.uniform_(-1, 1)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))  # BN, no ReLU; read by another BN and returned
        c = torch.relu(self.bn3(b))  # BN -> BN
        d = self.conv3(c)  # biased conv with a prologue, no BN after it
        e = self.bn4(self.pool(d))  # BN after a pool, followed by a pool
        return self.pool(e).flatten(1), b


def _loss(outputs, probes):
    return sum((o * p).sum() for o, p in zip(outputs, probes))


def _compare(model, ref, x, probes, what):
    outs, ref_outs = model(x), ref(x)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(o, r, f"{what}: output {i}")
    for m, o in ((model, outs), (ref, ref_outs)):
        for p in m.parameters():
            p.grad = None
        _loss(o, probes).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, f"{what}: gradient of {name}", scale=max(1.0, float(q.grad.abs().max())))


def test_biased_convs_and_chain_ends_fp64():
    ref = BiasAndEnds().double()
    model = tvm_rbn.restructure(copy.deepcopy(ref))
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert all(r.restructured for r in rows.values())
    assert rows["bn1"].stats.startswith("epilogue of conv1") and "bias folded" in rows["bn1"].stats
    assert rows["bn2"].stats.startswith("epilogue of conv2")
    assert rows["bn1"].apply == "prologue of conv2"
    assert "prologue of conv3" in rows["bn3"].apply
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    probes = [torch.randn(3, 24, generator=g, dtype=torch.float64),
              torch.randn(3, 8, 8, 8, generator=g, dtype=torch.float64)]
    for step in range(3):
        _compare(model, ref, x + step, probes, f"train step {step}")
        for m in (model, ref):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.05 * p.grad
    ours, theirs = model.state_dict(), ref.state_dict()
    for key in theirs:
        assert_close(ours[key].double(), theirs[key].double(), f"after 3 steps: {key}")
    model.eval(), ref.eval()
    _compare(model, ref, x, probes, "eval")  # eval-mode BatchNorms: bias folded into shift
