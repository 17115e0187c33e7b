"""Functional forward API of the restructured BatchNorm sub-layers, over torch tensors.

Tensors are contiguous NCHW, float32 or float64, on the host CPU. Outputs are newly allocated
and the kernels read the inputs in place (DLPack, no copies). Each distinct shape builds its
kernel once (cached on disk); see ``tvm_rbn.build.provider``.

A BatchNorm between two convolutions, restructured:

    y1, s, m2 = conv2d_stats(x, w1, padding=1)                         # conv + stats epilogue
    coeffs = bn_finalize(s, m2, tile_count(y1), bn.weight, bn.bias,
                         bn.running_mean, bn.running_var, bn.num_batches_tracked,
                         momentum=bn.momentum, eps=bn.eps)               # per channel
    y2 = bn_relu_conv2d(y1, coeffs.scale, coeffs.shift, w2, padding=1)  # prologue + conv
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks as check
from .build.provider import kernel
from .kernels import KernelSpec


class BNCoefficients(NamedTuple):
    """Per-channel results of the statistics: apply coefficients and what backward needs."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor


def tile_count(y: torch.Tensor) -> int:
    """Elements per statistics tile: one (n, k) plane of an NCHW tensor."""
    return int(y.shape[2] * y.shape[3])


def _conv(x, scale, shift, weight, stride, padding, relu, stats):
    x = check.tensor(x, "x", 4)
    weight = check.tensor(weight, "weight", 4)
    tensors = {"x": x, "weight": weight}
    if scale is not None or shift is not None:
        scale = check.tensor(scale, "scale", 1)
        shift = check.tensor(shift, "shift", 1)
        check.shape(scale, "scale", (x.shape[1],))
        check.shape(shift, "shift", (x.shape[1],))
        tensors.update(scale=scale, shift=shift)
    dtype = check.same_dtype(**tensors)
    stride = check.pair(stride, "stride", 1)
    padding = check.pair(padding, "padding", 0)
    n, c, h, w = x.shape
    k, wc, r, s = weight.shape
    if wc != c:
        raise check.InputError(
            f"weight has {wc} input channels (shape {tuple(weight.shape)}) but x has {c} (shape {tuple(x.shape)})"
        )
    p = (h + 2 * padding[0] - r) // stride[0] + 1
    q = (w + 2 * padding[1] - s) // stride[1] + 1
    if p <= 0 or q <= 0:
        raise check.InputError(
            f"kernel {r}x{s} with padding {padding} does not fit input {h}x{w}: output would be {p}x{q}"
        )
    spec = KernelSpec.make(
        "conv2d_fused", n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride, padding=padding,
        dtype=check.dtype_name(dtype), prologue_relu=relu if scale is not None else None, stats=stats,
    )
    fn = kernel(spec)
    y = x.new_empty((n, k, p, q))
    args = [x] + ([scale, shift] if scale is not None else []) + [weight, y]
    if not stats:
        fn(*args)
        return y
    tile_sum, tile_m2 = x.new_empty((n, k)), x.new_empty((n, k))
    fn(*args, tile_sum, tile_m2)
    return y, tile_sum, tile_m2


def conv2d_stats(x, weight, stride=1, padding=0):
    """conv2d(x, weight) with the statistics epilogue: (y, tile_sum, tile_m2) per (n, k) plane."""
    return _conv(x, None, None, weight, stride, padding, None, True)


def bn_relu_conv2d(x, scale, shift, weight, stride=1, padding=0, relu=True):
    """conv2d(relu(x*scale + shift), weight) with zero padding applied after the ReLU."""
    return _conv(x, scale, shift, weight, stride, padding, relu, False)


def bn_relu_conv2d_stats(x, scale, shift, weight, stride=1, padding=0, relu=True):
    """The kernel in the middle of a chain: prologue, conv, and statistics epilogue."""
    return _conv(x, scale, shift, weight, stride, padding, relu, True)


def batch_stats(x):
    """The statistics epilogue alone, for a tensor no fused conv produced: (tile_sum, tile_m2)."""
    x = check.tensor(x, "x", 4)
    fn = kernel(KernelSpec.make("tile_stats", shape=tuple(x.shape), dtype=check.dtype_name(x.dtype)))
    tile_sum, tile_m2 = x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])
    fn(x, tile_sum, tile_m2)
    return tile_sum, tile_m2


def _affine(weight, bias, channels: int, like: torch.Tensor):
    """affine=False BatchNorms have no weight/bias: use gamma=1, beta=0."""
    if weight is None:
        weight = torch.ones(channels, dtype=like.dtype)
    if bias is None:
        bias = torch.zeros(channels, dtype=like.dtype)
    weight, bias = check.tensor(weight, "weight", 1), check.tensor(bias, "bias", 1)
    check.shape(weight, "weight", (channels,))
    check.shape(bias, "bias", (channels,))
    return weight, bias


def bn_finalize(
    tile_sum, tile_m2, tile_count: int, weight=None, bias=None,
    running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1, eps=1e-5,
) -> BNCoefficients:
    """Training-mode BatchNorm statistics from the per-tile partials.

    Updates running_mean / running_var in place exactly as torch's BatchNorm2d does (unbiased
    running variance; momentum=None is the cumulative average over num_batches_tracked, which
    is incremented in place when given). Pass no running statistics for
    track_running_stats=False.
    """
    tile_sum = check.tensor(tile_sum, "tile_sum", 2)
    tile_m2 = check.tensor(tile_m2, "tile_m2", 2)
    check.shape(tile_m2, "tile_m2", tuple(tile_sum.shape))
    tiles, channels = tile_sum.shape
    if not isinstance(tile_count, int) or tile_count < 1:
        raise check.InputError(f"tile_count must be a positive int, got {tile_count!r}")
    m = tiles * tile_count
    if m < 2:
        raise check.InputError(f"Expected more than 1 value per channel when training, got {m}")
    weight, bias = _affine(weight, bias, channels, tile_sum)
    tensors = {"tile_sum": tile_sum, "tile_m2": tile_m2, "weight": weight, "bias": bias}
    update = running_mean is not None or running_var is not None
    if update:
        running_mean = check.tensor(running_mean, "running_mean", 1)
        running_var = check.tensor(running_var, "running_var", 1)
        check.shape(running_mean, "running_mean", (channels,))
        check.shape(running_var, "running_var", (channels,))
        tensors.update(running_mean=running_mean, running_var=running_var)
        if momentum is None and num_batches_tracked is None:
            raise check.InputError("momentum=None (cumulative average) needs num_batches_tracked")
    dtype = check.same_dtype(**tensors)
    fn = kernel(KernelSpec.make(
        "bn_finalize", num_tiles=tiles, channels=channels, tile_count=tile_count,
        dtype=check.dtype_name(dtype), update_running=update,
    ))
    out = [tile_sum.new_empty(channels) for _ in range(4)]
    if not update:
        fn(tile_sum, tile_m2, weight, bias, *out, float(eps))
        return BNCoefficients(*out)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    factor = float(momentum) if momentum is not None else 1.0 / float(num_batches_tracked)
    new_mean, new_var = tile_sum.new_empty(channels), tile_sum.new_empty(channels)
    fn(tile_sum, tile_m2, weight, bias, running_mean, running_var, *out, new_mean, new_var, float(eps), factor)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return BNCoefficients(*out)


def bn_eval_coefficients(weight, bias, running_mean, running_var, eps=1e-5):
    """Eval-mode BatchNorm as a fixed affine map: (scale, shift) from the running statistics."""
    running_mean = check.tensor(running_mean, "running_mean", 1)
    running_var = check.tensor(running_var, "running_var", 1)
    channels = running_mean.shape[0]
    check.shape(running_var, "running_var", (channels,))
    weight, bias = _affine(weight, bias, channels, running_mean)
    dtype = check.same_dtype(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    fn = kernel(KernelSpec.make("bn_eval_coeffs", channels=channels, dtype=check.dtype_name(dtype)))
    scale, shift = running_mean.new_empty(channels), running_mean.new_empty(channels)
    fn(weight, bias, running_mean, running_var, scale, shift, float(eps))
    return scale, shift


def bn_relu(x, scale, shift, relu=True):
    """Standalone apply: relu(x*scale + shift), for where a chain ends."""
    x = check.tensor(x, "x", 4)
    scale, shift = check.tensor(scale, "scale", 1), check.tensor(shift, "shift", 1)
    check.shape(scale, "scale", (x.shape[1],))
    check.shape(shift, "shift", (x.shape[1],))
    dtype = check.same_dtype(x=x, scale=scale, shift=shift)
    fn = kernel(KernelSpec.make("bn_apply", shape=tuple(x.shape), dtype=check.dtype_name(dtype), relu=relu))
    y = torch.empty_like(x)
    fn(x, scale, shift, y)
    return y
