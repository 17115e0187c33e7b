"""Channel-slice views X[:, a:b] of a contiguous NCHW tensor are read and written in place by
the kernels (the DenseNet block buffer): results equal those on contiguous copies."""
from __future__ import annotations

import pytest
import torch

import tvm_rbn.functional as rbn

from conftest import assert_close

F64 = torch.float64


@pytest.mark.parametrize("n", [2, 1], ids=["batch2", "batch1-contiguous-but-offset"])
def test_conv_reads_and_writes_channel_slices(n):
    X = torch.randn(n, 13, 6, 7, dtype=F64)
    w = torch.randn(5, 6, 3, 3, dtype=F64)
    scale, shift = torch.rand(6, dtype=F64) + 0.5, torch.randn(6, dtype=F64)
    expected = rbn.bn_relu_conv2d_stats(X[:, 1:7].contiguous(), scale, shift, w, 1, 1)
    buffer = torch.zeros(n, 13, 6, 7, dtype=F64)
    got = rbn.bn_relu_conv2d_stats(X[:, 1:7], scale, shift, w, 1, 1, out=buffer[:, 3:8])
    assert got[0].data_ptr() == buffer[:, 3:8].data_ptr()
    for name, a, b in zip(("y", "tile_sum", "tile_m2"), got, expected):
        assert_close(a, b, name)
    assert_close(buffer[:, 3:8], expected[0], "written into the buffer")
    assert not buffer[:, :3].any() and not buffer[:, 8:].any(), "wrote outside its slice"


def test_backward_kernels_read_channel_slices():
    X, G = torch.randn(2, 13, 6, 7, dtype=F64), torch.randn(2, 13, 6, 7, dtype=F64)
    w = torch.randn(5, 6, 3, 3, dtype=F64)
    ones, c2, c3 = torch.ones(5, dtype=F64), torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    co = rbn.BNCoefficients(torch.rand(6, dtype=F64) + 0.5, torch.randn(6, dtype=F64), torch.randn(6, dtype=F64),
                            torch.rand(6, dtype=F64) + 0.5)
    view = rbn.DeferredGrad(G[:, 3:8], X[:, 3:8], ones, c2, c3)
    copy = rbn.DeferredGrad(G[:, 3:8].contiguous(), X[:, 3:8].contiguous(), ones, c2, c3)
    for a, b in zip(rbn.conv2d_dgrad_bn_relu(view, w, X[:, 1:7], co, 1, 1),
                    rbn.conv2d_dgrad_bn_relu(copy, w, X[:, 1:7].contiguous(), co, 1, 1)):
        assert_close(a, b, "dgrad with epilogue")
    assert_close(rbn.bn_relu_conv2d_wgrad(view, X[:, 1:7], co.scale, co.shift, 3, 1, 1),
                 rbn.bn_relu_conv2d_wgrad(copy, X[:, 1:7].contiguous(), co.scale, co.shift, 3, 1, 1), "wgrad")
    gc = rbn.BNGradCoefficients(ones, ones, ones, c2, c3)
    assert_close(rbn.bn_backward_dx(G[:, 3:8], X[:, 3:8], gc), rbn.bn_backward_dx(*copy[:2], gc), "dx")


def test_channel_stats_kernel():
    y = torch.randn(3, 7, 25, dtype=F64) * 3 + 100
    mean, var = rbn.bn_channel_stats(y.sum(2), ((y - y.mean(2, keepdim=True)) ** 2).sum(2), 25)
    flat = y.permute(1, 0, 2).reshape(7, -1)
    assert_close(mean, flat.mean(1), "mean", scale=100.0)
    assert_close(var, flat.var(1, unbiased=False), "biased variance")
