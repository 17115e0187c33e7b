"""Bad input is refused with an error naming the problem, before any kernel is built or run."""
from __future__ import annotations

import pytest
import torch

import tvm_rbn.functional as rbn
from tvm_rbn._checks import InputError


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    def refuse(spec):
        raise AssertionError(f"a kernel was requested ({spec.op}) before validation finished")

    monkeypatch.setattr(rbn, "kernel", refuse)


def x_(*shape, **kw):
    return torch.randn(*(shape or (2, 4, 6, 6)), **kw)


def w_(k=8, c=4, r=3, **kw):
    return torch.randn(k, c, r, r, **kw)


BAD_CONV_CALLS = [
    ("int-dtype", lambda: rbn.conv2d_stats(x_().int(), w_().int()), "dtype torch.int32"),
    ("half-dtype", lambda: rbn.conv2d_stats(x_().half(), w_().half()), "dtype torch.float16"),
    ("mixed-dtypes", lambda: rbn.conv2d_stats(x_(), w_().double()), "dtypes differ"),
    ("meta-device", lambda: rbn.conv2d_stats(x_(device="meta"), w_()), "device meta"),
    ("weight-channels", lambda: rbn.conv2d_stats(x_(), w_(c=5)), "5 input channels"),
    ("3d-input", lambda: rbn.conv2d_stats(torch.randn(4, 6, 6), w_()), "4 dimensions"),
    ("non-contiguous", lambda: rbn.conv2d_stats(x_(2, 4, 6, 6).transpose(2, 3), w_()), "not contiguous"),
    ("channels-last", lambda: rbn.conv2d_stats(x_().to(memory_format=torch.channels_last), w_()), "channels_last"),
    ("empty-batch", lambda: rbn.conv2d_stats(x_(0, 4, 6, 6), w_()), "empty"),
    ("kernel-too-big", lambda: rbn.conv2d_stats(x_(1, 4, 2, 2), w_()), "does not fit"),
    ("bad-stride", lambda: rbn.conv2d_stats(x_(), w_(), stride=0), "stride must be >= 1"),
    ("negative-padding", lambda: rbn.conv2d_stats(x_(), w_(), padding=-1), "padding must be >= 0"),
    ("float-padding", lambda: rbn.conv2d_stats(x_(), w_(), padding=1.5), "padding must be an int"),
    ("scale-length", lambda: rbn.bn_relu_conv2d(x_(), torch.ones(3), torch.ones(4), w_()), "scale has shape (3,)"),
    ("shift-missing", lambda: rbn.bn_relu_conv2d(x_(), torch.ones(4), None, w_()), "shift must be a torch.Tensor"),
    ("requires-grad", lambda: rbn.conv2d_stats(x_(requires_grad=True), w_()), "requires grad"),
    ("not-a-tensor", lambda: rbn.conv2d_stats(x_().numpy(), w_()), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_CONV_CALLS], ids=[c[0] for c in BAD_CONV_CALLS])
def test_conv_refuses(call, message):
    with pytest.raises(InputError, match=_escape(message)):
        call()


BAD_BN_CALLS = [
    ("finalize-one-value", lambda: rbn.bn_finalize(torch.ones(1, 4), torch.zeros(1, 4), 1), "more than 1 value"),
    ("finalize-m2-shape", lambda: rbn.bn_finalize(torch.ones(2, 4), torch.zeros(2, 3), 5), "tile_m2 has shape"),
    ("finalize-gamma-shape", lambda: rbn.bn_finalize(torch.ones(2, 4), torch.zeros(2, 4), 5, torch.ones(3)), "weight has shape"),
    ("finalize-cumulative-without-counter",
     lambda: rbn.bn_finalize(torch.ones(2, 4), torch.zeros(2, 4), 5, None, None, torch.zeros(4), torch.ones(4), momentum=None),
     "needs num_batches_tracked"),
    ("finalize-running-dtype",
     lambda: rbn.bn_finalize(torch.ones(2, 4), torch.zeros(2, 4), 5, None, None, torch.zeros(4).double(), torch.ones(4).double()),
     "dtypes differ"),
    ("eval-var-shape", lambda: rbn.bn_eval_coefficients(None, None, torch.zeros(4), torch.ones(5)), "running_var has shape"),
    ("apply-scale-shape", lambda: rbn.bn_relu(x_(), torch.ones(5), torch.ones(4)), "scale has shape"),
    ("stats-empty", lambda: rbn.batch_stats(x_(2, 0, 3, 3)), "empty"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_BN_CALLS], ids=[c[0] for c in BAD_BN_CALLS])
def test_bn_refuses(call, message):
    with pytest.raises(InputError, match=_escape(message)):
        call()


def test_running_statistics_untouched_on_error():
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(3)
    with pytest.raises(InputError):
        rbn.bn_finalize(torch.ones(2, 4), torch.zeros(2, 4), 5, torch.ones(3), None, rm, rv, nbt, momentum=None)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)) and nbt.item() == 3


def _escape(text: str) -> str:
    import re

    return re.escape(text)
