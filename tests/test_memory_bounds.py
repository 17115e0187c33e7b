"""Kernels read only inside their inputs: each input is placed against a page with no access
(PROT_NONE), once ending at it and once starting after it, so a read past either end faults;
and training steps run with every kernel output on a guarded pool block (the next kernels'
inputs, at a model's shapes).

Such a read usually goes unseen (the memory beside a tensor is mapped) and crashes only when
it is not: a training step died at random this way in the max pool's backward. Each case runs
in a child process, where a fault fails the test instead of ending the test session.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tvm_rbn.runtime import buffers


def guarded(t: torch.Tensor, at: str) -> torch.Tensor:
    """A contiguous copy of `t` between inaccessible pages, its bytes ending within 64 of the
    one after (at="end") or starting right after the one before (at="start")."""
    array, offset = buffers.guarded_array(t.numel() * t.element_size(), at)
    out = torch.frombuffer(array, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    out.copy_(t)
    return out


def _stem_pool(at):
    """The ResNet stem's 3x3 stride-2 max pool (windows reach past the output at both ends);
    row sizes whose byte counts are multiples of 64, so the end guard is right there."""
    import tvm_rbn.functional as rbn

    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2, 16, 16, generator=g)
    co = rbn.BNCoefficients(torch.rand(2, generator=g) + 0.5, torch.randn(2, generator=g),
                            torch.randn(2, generator=g), torch.rand(2, generator=g) + 0.5)
    pooled, tap = rbn.bn_relu_maxpool(guarded(y, at), guarded(co.scale, at), guarded(co.shift, at), 3, 2, 1)
    dpool = torch.randn(pooled.shape, generator=g)
    rbn.bn_relu_maxpool_backward(guarded(dpool, at), guarded(tap, at), guarded(y, at), co, 3, 2, 1)


def _transition_pool(at):
    """A DenseNet transition's average pool on a plane that 2x2 windows do not divide (floor
    mode drops the last row and column: the backward must not read a pooled row past the end),
    row sizes of 16 floats so the pooled gradient ends at the guard."""
    import tvm_rbn.functional as rbn

    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2, 33, 33, generator=g)
    co = rbn.BNCoefficients(torch.rand(2, generator=g) + 0.5, torch.randn(2, generator=g),
                            torch.randn(2, generator=g), torch.rand(2, generator=g) + 0.5)
    pooled = rbn.bn_relu_avgpool(guarded(y, at), guarded(co.scale, at), guarded(co.shift, at), 2)
    dpool = torch.randn(pooled.shape, generator=g)
    rbn.bn_relu_avgpool_backward(guarded(dpool, at), guarded(y, at), co, 2)


def _residual(at):
    import tvm_rbn.functional as rbn

    g = torch.Generator().manual_seed(0)
    y, identity = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    co = rbn.BNCoefficients(torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g),
                            torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5)
    a = rbn.bn_add_relu(guarded(y, at), guarded(co.scale, at), guarded(co.shift, at), guarded(identity, at))
    rbn.bn_add_relu_backward(guarded(torch.randn(a.shape, generator=g), at), guarded(a, at), guarded(y, at), co)


def _conv_3x3_s2(at):
    """A strided, padded 3x3 conv: forward with the BatchNorm prologue and statistics, data and
    weight gradients (their inputs are read through padding and stride gaps)."""
    import tvm_rbn.functional as rbn

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 8, 8, generator=g), torch.randn(16, 16, 3, 3, generator=g)
    scale, shift = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    y, _, _ = rbn.bn_relu_conv2d_stats(guarded(x, at), guarded(scale, at), guarded(shift, at), guarded(w, at), 2, 1)
    grad = torch.randn(y.shape, generator=g)
    rbn.conv2d_dgrad(guarded(grad, at), guarded(w, at), tuple(x.shape), 2, 1)
    rbn.bn_relu_conv2d_wgrad(guarded(grad, at), guarded(x, at), guarded(scale, at), guarded(shift, at), 3, 2, 1)


def _guarded_training_steps():
    """Two resnet18 training steps with every kernel output on a guarded pool block
    (TVM_RBN_BUFFER_GUARD=1, MIN_BYTES 0): outputs end against an inaccessible page, and
    they are the next kernels' inputs, at a model's shapes and in a model's order."""
    import torch.nn.functional as F

    import tvm_rbn
    from tvm_rbn.models import MODELS

    assert buffers.guarded()
    buffers.MIN_BYTES = 0
    torch.manual_seed(0)
    model = tvm_rbn.restructure(MODELS["resnet18"](num_classes=10).train())
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, target = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)
        F.cross_entropy(model(x), target).backward()
    assert buffers.pooled_bytes()["idle"] + buffers.pooled_bytes()["in_use"] > 0


CASES = {"stem-max-pool": _stem_pool, "transition-avg-pool": _transition_pool, "residual-end": _residual,
         "conv-3x3-s2-p1": _conv_3x3_s2}


def _run_child(call: str, what: str, **env) -> None:
    child = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
             f"import test_memory_bounds as m; {call}; print('ok')")
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=900,
                            env={**os.environ, **env})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"{what} exited with {result.returncode}"
        f"{' (SIGSEGV: a kernel read or wrote outside its tensors)' if result.returncode == -11 else ''}:\n"
        f"{result.stderr[-3000:]}")


@pytest.mark.parametrize("at", ["end", "start"])
@pytest.mark.parametrize("case", CASES)
def test_kernels_read_only_inside_their_inputs(case, at):
    _run_child(f"m.CASES[{case!r}]({at!r})", f"{case} with inputs against a guard page at their {at}")


def test_training_steps_with_every_output_against_a_guard_page():
    _run_child("m._guarded_training_steps()", "resnet18 training steps on guarded pool blocks",
               TVM_RBN_BUFFER_GUARD="1")
