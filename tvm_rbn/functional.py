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

Backward. Only the raw conv outputs (y1, y2 below), the conv weights, the model input and the
per-channel BNCoefficients are kept from the forward pass; z, the ReLU output and the BatchNorm
input gradients are recomputed inside the kernels that need them. A chain
conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu, whose output feeds something else:

    # forward
    y1, s1, q1 = conv2d_stats(x0, w1, padding=1)
    bn1 = bn_finalize(s1, q1, tile_count(y1), g1, b1)
    y2, s2, q2 = bn_relu_conv2d_stats(y1, bn1.scale, bn1.shift, w2, padding=1)
    bn2 = bn_finalize(s2, q2, tile_count(y2), g2, b2)
    out = bn_relu(y2, bn2.scale, bn2.shift)                         # chain ends: standalone apply

    # backward, given dout = d loss / d out
    dz2, tb2, tg2 = bn_relu_backward_stats(dout, y2, bn2)             # standalone epilogue
    gc2 = bn_backward_finalize(tb2, tg2, tile_count(y2), bn2)         # dgamma2, dbeta2, c1..c3
    dy2 = bn_input_grad(dz2, y2, gc2)                                 # c1*dz2 + c2*y2 + c3, deferred
    dw2 = bn_relu_conv2d_wgrad(dy2, y1, bn1.scale, bn1.shift, 3, padding=1)  # both prologues
    dz1, tb1, tg1 = conv2d_dgrad_bn_relu(dy2, w2, y1, bn1, padding=1)  # prologue + dgrad + epilogue
    gc1 = bn_backward_finalize(tb1, tg1, tile_count(y1), bn1)
    dy1 = bn_input_grad(dz1, y1, gc1)
    dw1 = conv2d_wgrad(dy1, x0, 3, padding=1)                          # chain start: plain input
    dx0 = conv2d_dgrad(dy1, w1, x0.shape, padding=1)                   # only if x0 needs a gradient

gc1.dgamma, gc1.dbeta, gc2.dgamma, gc2.dbeta, dw1, dw2 and dx0 are the gradients autograd would
give for x0, w1, w2 and the BatchNorm weights and biases. A BatchNorm without a ReLU passes
relu=False to the epilogue/prologue functions; where a BatchNorm's input gradient must exist as
a tensor (its conv input is not one of ours), ``bn_backward_dx`` materializes it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks as check
from .runtime import buffers
from .build import provider
from .kernels import KernelSpec

# Bytes: the kernels' compact buffers are declared with TVM's default data alignment, and the
# generated code may use aligned vector loads on them, so a tensor starting elsewhere (a row
# of a (4, C) coefficient tensor, say) must not be passed as is.
KERNEL_ALIGNMENT = 64


def _aligned(t):
    if isinstance(t, torch.Tensor) and t.is_contiguous() and t.data_ptr() % KERNEL_ALIGNMENT:
        return t.clone(memory_format=torch.contiguous_format)  # fresh storage is aligned
    return t


def kernel(spec: KernelSpec):
    """The kernel for `spec`, called with each misaligned contiguous input replaced by an
    aligned copy (outputs are fresh, aligned tensors, or views that the spec declares, with
    element alignment, like the channel-slice inputs: those are passed as they are)."""
    fn = provider.kernel(spec)
    declared = {index for index, _ in spec.kwargs.get("views", ())}

    def call(*args):
        return fn(*(a if i in declared else _aligned(a) for i, a in enumerate(args)))

    return call


class BNCoefficients(NamedTuple):
    """Per-channel results of the statistics: apply coefficients and what backward needs."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor


def tile_count(y: torch.Tensor) -> int:
    """Elements per statistics tile: one (n, k) plane of an NCHW tensor."""
    return int(y.shape[2] * y.shape[3])


def _views(args) -> dict:
    """KernelSpec ``views`` for the channel slices among a kernel's arguments ({} if none):
    the non-contiguous ones, and contiguous ones that do not start 64-byte aligned (a slice
    of a batch of one)."""
    views = []
    for i, a in enumerate(args):
        total = check.channel_view_total(a) if isinstance(a, torch.Tensor) else None
        if total is not None and (total != a.shape[1] or a.data_ptr() % KERNEL_ALIGNMENT):
            views.append((i, total))
    return {"views": tuple(views)} if views else {}


def _out(out, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A new output tensor, or `out` (a contiguous tensor or a channel-slice view) checked."""
    if out is None:
        return buffers.empty_like(like, shape)
    out = check.tensor(out, name, len(shape), channel_view=True)
    check.shape(out, name, shape)
    check.same_dtype(**{name: out, "input": like})
    return out


def _conv(x, scale, shift, weight, stride, padding, relu, stats, out=None):
    x = check.tensor(x, "x", 4, channel_view=True)
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
    y = _out(out, "out", (n, k, p, q), x)
    args = [x] + ([scale, shift] if scale is not None else []) + [weight, y]
    spec = KernelSpec.make(
        "conv2d_fused", n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride, padding=padding,
        dtype=check.dtype_name(dtype), prologue_relu=relu if scale is not None else None, stats=stats,
        **_views(args),
    )
    fn = kernel(spec)
    if not stats:
        fn(*args)
        return y
    tile_sum, tile_m2 = x.new_empty((n, k)), x.new_empty((n, k))
    fn(*args, tile_sum, tile_m2)
    return y, tile_sum, tile_m2


def conv2d(x, weight, stride=1, padding=0, *, out=None):
    """conv2d(x, weight), for a conv with no BatchNorm to fuse on either side (a DenseNet
    transition's 1x1 conv, moved after its pool); x and `out` as in ``conv2d_stats``."""
    return _conv(x, None, None, weight, stride, padding, None, False, out)


def conv2d_stats(x, weight, stride=1, padding=0, *, out=None):
    """conv2d(x, weight) with the statistics epilogue: (y, tile_sum, tile_m2) per (n, k) plane.

    x may be a channel slice X[:, a:b] of a contiguous NCHW tensor, read in place; with `out`
    (a new-enough tensor of the output's shape, contiguous or such a channel slice), y is
    written there (the other convolutions and the backward functions take channel slices
    the same way where noted)."""
    return _conv(x, None, None, weight, stride, padding, None, True, out)


def bn_relu_conv2d(x, scale, shift, weight, stride=1, padding=0, relu=True):
    """conv2d(relu(x*scale + shift), weight) with zero padding applied after the ReLU."""
    return _conv(x, scale, shift, weight, stride, padding, relu, False)


def bn_relu_conv2d_stats(x, scale, shift, weight, stride=1, padding=0, relu=True, *, out=None):
    """The kernel in the middle of a chain: prologue, conv, and statistics epilogue (x and
    `out`: channel slices accepted, as in ``conv2d_stats``)."""
    return _conv(x, scale, shift, weight, stride, padding, relu, True, out)


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


def bn_channel_stats(tile_sum, tile_m2, tile_count: int):
    """Per-channel batch (mean, biased variance) from per-tile partials, for statistics that
    several BatchNorms share (each then forms its own coefficients)."""
    tile_sum = check.tensor(tile_sum, "tile_sum", 2)
    tile_m2 = check.tensor(tile_m2, "tile_m2", 2)
    check.shape(tile_m2, "tile_m2", tuple(tile_sum.shape))
    if not isinstance(tile_count, int) or isinstance(tile_count, bool) or tile_count < 1:
        raise check.InputError(f"tile_count must be a positive int, got {tile_count!r}")
    dtype = check.same_dtype(tile_sum=tile_sum, tile_m2=tile_m2)
    tiles, channels = tile_sum.shape
    fn = kernel(KernelSpec.make("bn_channel_stats", num_tiles=tiles, channels=channels, tile_count=tile_count,
                                dtype=check.dtype_name(dtype)))
    mean, var = tile_sum.new_empty(channels), tile_sum.new_empty(channels)
    fn(tile_sum, tile_m2, mean, var)
    return mean, var


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
    y = buffers.empty_like(x)
    fn(x, scale, shift, y)
    return y


def _channel_pair(scale, shift, c: int, names=("scale", "shift")):
    scale, shift = check.tensor(scale, names[0], 1), check.tensor(shift, names[1], 1)
    check.shape(scale, names[0], (c,))
    check.shape(shift, names[1], (c,))
    return scale, shift


def bn_add_relu(y, scale, shift, identity=None, *, y2=None, scale2=None, shift2=None):
    """The end of a residual block in one pass: relu(y*scale + shift + identity), or, with a
    projection shortcut's BatchNorm, relu(y*scale + shift + y2*scale2 + shift2)."""
    y = check.tensor(y, "y", 4)
    scale, shift = _channel_pair(scale, shift, y.shape[1])
    tensors = {"y": y, "scale": scale, "shift": shift}
    if (identity is None) == (y2 is None):
        raise check.InputError("give exactly one of identity or y2 (with scale2, shift2)")
    if identity is not None:
        identity = check.tensor(identity, "identity", 4)
        check.shape(identity, "identity", tuple(y.shape))
        other = [identity]
        tensors["identity"] = identity
    else:
        y2 = check.tensor(y2, "y2", 4)
        check.shape(y2, "y2", tuple(y.shape))
        scale2, shift2 = _channel_pair(scale2, shift2, y.shape[1], ("scale2", "shift2"))
        other = [y2, scale2, shift2]
        tensors.update(y2=y2, scale2=scale2, shift2=shift2)
    dtype = check.same_dtype(**tensors)
    fn = kernel(KernelSpec.make("bn_add_relu", shape=tuple(y.shape), dtype=check.dtype_name(dtype),
                                second_bn=y2 is not None))
    a = buffers.empty_like(y)
    fn(y, scale, shift, *other, a)
    return a


def bn_add_relu_backward(da, a, y, coeffs, y2=None, coeffs2=None):
    """Backward of ``bn_add_relu`` in one pass, from the output ``a`` (the ReLU mask is a > 0).

    coeffs (coeffs2): the forward ``BNCoefficients`` of the BatchNorm over y (y2); scale, mean
    and invstd are used. Returns (grad_y, grad_y2 or grad_identity, tile_dbeta, tile_dgamma
    [, tile_dgamma2]): the gradients at y (scale*dz) and at y2 (scale2*dz) or at identity
    (dz), with dz = da*[a > 0], and per (n, c) plane the partials of dbeta = sum dz (the same
    for both BatchNorms) and dgamma = sum dz*xhat of each BatchNorm.
    """
    da = check.tensor(da, "da", 4)
    a, y = check.tensor(a, "a", 4), check.tensor(y, "y", 4)
    check.shape(a, "a", tuple(da.shape))
    check.shape(y, "y", tuple(da.shape))
    c = da.shape[1]
    names = ("scale", "mean", "invstd")
    ct = _bn_forward_coeffs(coeffs, c, names)
    tensors = {"da": da, "a": a, "y": y, **ct}
    args = [da, a, y, ct["mean"], ct["invstd"], ct["scale"]]
    if y2 is not None:
        y2 = check.tensor(y2, "y2", 4)
        check.shape(y2, "y2", tuple(da.shape))
        ct2 = _bn_forward_coeffs(coeffs2, c, names)
        tensors.update(y2=y2, **{f"{k}2": v for k, v in ct2.items()})
        args += [y2, ct2["mean"], ct2["invstd"], ct2["scale"]]
    dtype = check.same_dtype(**tensors)
    fn = kernel(KernelSpec.make("bn_add_relu_backward", shape=tuple(da.shape), dtype=check.dtype_name(dtype),
                                second_bn=y2 is not None))
    outs = [buffers.empty_like(da), buffers.empty_like(da), da.new_empty(da.shape[:2]), da.new_empty(da.shape[:2])]
    if y2 is not None:
        outs.append(da.new_empty(da.shape[:2]))
    fn(*args, *outs)
    return tuple(outs)


def pool_geometry(kernel_size, stride=None, padding=0) -> dict:
    """max_pool2d's arguments as pairs: {"kernel", "stride" (default: the kernel), "padding"}."""
    kernel = check.pair(kernel_size, "kernel_size", 1)
    return {"kernel": kernel, "stride": check.pair(stride, "stride", 1) if stride else kernel,
            "padding": check.pair(padding, "padding", 0)}


def pool_output_shape(shape, geo: dict) -> tuple:
    """The pooled (N, C, P, Q) of an input `shape` (floor mode)."""
    (kh, kw), (sh, sw), (ph, pw) = geo["kernel"], geo["stride"], geo["padding"]
    return (shape[0], shape[1], (shape[2] + 2 * ph - kh) // sh + 1, (shape[3] + 2 * pw - kw) // sw + 1)


def _checked_pool_geometry(x, kernel_size, stride, padding) -> dict:
    geo = pool_geometry(kernel_size, stride, padding)
    kernel, padding = geo["kernel"], geo["padding"]
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise check.InputError(f"max-pool padding {padding} exceeds half the kernel {kernel}")
    h, w = x.shape[2:]
    if h + 2 * padding[0] < kernel[0] or w + 2 * padding[1] < kernel[1]:
        raise check.InputError(f"max-pool kernel {kernel} is larger than the padded input {tuple(x.shape)}")
    return geo


def bn_relu_maxpool(x, scale, shift, kernel_size, stride=None, padding=0, relu=True):
    """max_pool2d(relu(x*scale + shift)) in one pass (dilation 1, floor mode), the applied
    activation never stored. Returns (pooled, tap): tap (int32) is the window position
    i*kw + j of each maximum (the first, in row-major order, as PyTorch picks it), for
    ``bn_relu_maxpool_backward``."""
    x = check.tensor(x, "x", 4)
    scale, shift = _channel_pair(scale, shift, x.shape[1])
    dtype = check.same_dtype(x=x, scale=scale, shift=shift)
    geo = _checked_pool_geometry(x, kernel_size, stride, padding)
    fn = kernel(KernelSpec.make("bn_relu_maxpool", shape=tuple(x.shape), dtype=check.dtype_name(dtype),
                                relu=bool(relu), **geo))
    pooled = buffers.empty_like(x, pool_output_shape(x.shape, geo))
    tap = buffers.empty_like(x, pooled.shape, torch.int32)
    fn(x, scale, shift, pooled, tap)
    return pooled, tap


def bn_relu_maxpool_backward(dpool, tap, x_raw, coeffs, kernel_size, stride=None, padding=0, relu=True):
    """Backward of ``bn_relu_maxpool`` in one pass over (dpool, tap, x_raw): each window's
    gradient goes to its maximum, masked by the ReLU. coeffs: the BatchNorm's forward
    ``BNCoefficients``. Returns (grad_y = scale*dz, tile_dbeta, tile_dgamma) as
    ``bn_add_relu_backward`` does for y."""
    x_raw = check.tensor(x_raw, "x_raw", 4)
    dpool = check.tensor(dpool, "dpool", 4)
    geo = _checked_pool_geometry(x_raw, kernel_size, stride, padding)
    check.shape(dpool, "dpool", pool_output_shape(x_raw.shape, geo))
    ct = _bn_forward_coeffs(coeffs, x_raw.shape[1])
    dtype = check.same_dtype(dpool=dpool, x_raw=x_raw, **ct)
    if tap.dtype != torch.int32 or tuple(tap.shape) != tuple(dpool.shape) or tap.device != dpool.device:
        raise check.InputError(f"tap must be int32 of dpool's shape {tuple(dpool.shape)} on {dpool.device}; got "
                               f"{tap.dtype} {tuple(tap.shape)} on {tap.device}")
    fn = kernel(KernelSpec.make("bn_relu_maxpool_backward", shape=tuple(x_raw.shape), dtype=check.dtype_name(dtype),
                                relu=bool(relu), **geo))
    outs = [buffers.empty_like(x_raw), x_raw.new_empty(x_raw.shape[:2]), x_raw.new_empty(x_raw.shape[:2])]
    fn(dpool, tap.contiguous(), x_raw, ct["scale"], ct["shift"], ct["mean"], ct["invstd"], *outs)
    return tuple(outs)


def _checked_avgpool_kernel(x, kernel_size) -> tuple[int, int]:
    window = check.pair(kernel_size, "kernel_size", 1)
    if x.shape[2] < window[0] or x.shape[3] < window[1]:
        raise check.InputError(f"average-pool kernel {window} is larger than the input {tuple(x.shape)}")
    return window


def bn_relu_avgpool(x, scale, shift, kernel_size, relu=True):
    """avg_pool2d(relu(x*scale + shift), kernel_size) over non-overlapping windows (stride =
    kernel, no padding, floor mode) in one pass, the applied activation never stored."""
    x = check.tensor(x, "x", 4)
    scale, shift = _channel_pair(scale, shift, x.shape[1])
    dtype = check.same_dtype(x=x, scale=scale, shift=shift)
    window = _checked_avgpool_kernel(x, kernel_size)
    fn = kernel(KernelSpec.make("bn_relu_avgpool", shape=tuple(x.shape), dtype=check.dtype_name(dtype),
                                relu=bool(relu), kernel=window))
    pooled = buffers.empty_like(x, avgpool_output_shape(x.shape, window))
    fn(x, scale, shift, pooled)
    return pooled


def avgpool_output_shape(shape, window) -> tuple:
    return (shape[0], shape[1], shape[2] // window[0], shape[3] // window[1])


def bn_relu_avgpool_backward(dpool, x_raw, coeffs, kernel_size, relu=True):
    """Backward of ``bn_relu_avgpool`` in one pass over (dpool, x_raw): each window's gradient
    spread over it, masked by the ReLU. coeffs: the BatchNorm's forward ``BNCoefficients``.
    Returns (grad_y = scale*dz, tile_dbeta, tile_dgamma) as ``bn_relu_maxpool_backward``."""
    x_raw = check.tensor(x_raw, "x_raw", 4)
    dpool = check.tensor(dpool, "dpool", 4)
    window = _checked_avgpool_kernel(x_raw, kernel_size)
    check.shape(dpool, "dpool", avgpool_output_shape(x_raw.shape, window))
    ct = _bn_forward_coeffs(coeffs, x_raw.shape[1])
    dtype = check.same_dtype(dpool=dpool, x_raw=x_raw, **ct)
    fn = kernel(KernelSpec.make("bn_relu_avgpool_backward", shape=tuple(x_raw.shape),
                                dtype=check.dtype_name(dtype), relu=bool(relu), kernel=window))
    outs = [buffers.empty_like(x_raw), x_raw.new_empty(x_raw.shape[:2]), x_raw.new_empty(x_raw.shape[:2])]
    fn(dpool, x_raw, ct["scale"], ct["shift"], ct["mean"], ct["invstd"], *outs)
    return tuple(outs)


# ---------------------------------------------------------------------------------------------
# Backward. See the "Backward" section of the module docstring for a worked chain.


class BNGradCoefficients(NamedTuple):
    """Per-channel results of a BatchNorm's backward finalize.

    dgamma, dbeta: the parameter gradients. c1, c2, c3: the input gradient of the BatchNorm
    is dx = c1*dz + c2*x + c3, with x its raw input (the conv output) and dz the gradient at
    its output z (after the ReLU mask).
    """

    dgamma: torch.Tensor
    dbeta: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor


class DeferredGrad(NamedTuple):
    """The gradient c1*dz + c2*x + c3 at a BatchNorm's input, left unmaterialized.

    Passed as `grad` to the dgrad/wgrad functions, it is formed tile by tile in the kernel's
    prologue instead of being written to memory. Make one with ``bn_input_grad``;
    ``bn_backward_dx`` materializes it where a consumer needs the tensor.
    """

    dz: torch.Tensor
    x: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor


def _bn_forward_coeffs(coeffs, channels: int, names=("scale", "shift", "mean", "invstd")) -> dict:
    """The named per-channel tensors of a BNCoefficients (forward) tuple, validated."""
    if not all(hasattr(coeffs, name) for name in names):
        raise check.InputError(
            f"coeffs must be the BNCoefficients returned by bn_finalize (with {', '.join(names)}), "
            f"got {type(coeffs).__name__}"
        )
    out = {}
    for name in names:
        t = check.tensor(getattr(coeffs, name), f"coeffs.{name}", 1)
        check.shape(t, f"coeffs.{name}", (channels,))
        out[name] = t
    return out


def _deferred(dz, x, c1, c2, c3) -> DeferredGrad:
    dz = check.tensor(dz, "dz", 4, channel_view=True)
    x = check.tensor(x, "x", 4, channel_view=True)
    check.shape(x, "x", tuple(dz.shape))
    channels = dz.shape[1]
    cs = []
    for name, t in (("c1", c1), ("c2", c2), ("c3", c3)):
        t = check.tensor(t, name, 1)
        check.shape(t, name, (channels,))
        cs.append(t)
    check.same_dtype(dz=dz, x=x, c1=cs[0], c2=cs[1], c3=cs[2])
    return DeferredGrad(dz, x, *cs)


def bn_input_grad(dz, x, grad_coeffs: BNGradCoefficients) -> DeferredGrad:
    """The BatchNorm input gradient c1*dz + c2*x + c3, deferred to the next kernel's prologue.

    dz: the gradient at the BatchNorm output (from the dgrad epilogue or
    ``bn_relu_backward_stats``); x: the BatchNorm's raw input; grad_coeffs: from
    ``bn_backward_finalize``. No kernel runs.
    """
    if not isinstance(grad_coeffs, BNGradCoefficients):
        raise check.InputError(
            f"grad_coeffs must be the BNGradCoefficients returned by bn_backward_finalize, "
            f"got {type(grad_coeffs).__name__}"
        )
    return _deferred(dz, x, grad_coeffs.c1, grad_coeffs.c2, grad_coeffs.c3)


def _grad_operand(grad) -> tuple[list, bool]:
    """Kernel arguments for a conv output gradient: [grad] or [dz, x, c1, c2, c3]."""
    if isinstance(grad, DeferredGrad):
        return list(_deferred(*grad)), True
    if isinstance(grad, torch.Tensor):
        return [check.tensor(grad, "grad", 4)], False
    raise check.InputError(
        f"grad must be a torch.Tensor or a DeferredGrad (from bn_input_grad), got {type(grad).__name__}"
    )


def _backward_geometry(grad_args, channels: int, hw, kernel_size, stride, padding) -> dict:
    """Check a conv's backward operands against each other; returns the kernel spec params."""
    g = grad_args[0]
    n, k, p, q = g.shape
    stride = check.pair(stride, "stride", 1)
    padding = check.pair(padding, "padding", 0)
    r, s = check.pair(kernel_size, "kernel_size", 1)
    h, w = hw
    ep = (h + 2 * padding[0] - r) // stride[0] + 1
    eq = (w + 2 * padding[1] - s) // stride[1] + 1
    if ep <= 0 or eq <= 0:
        raise check.InputError(
            f"kernel {r}x{s} with padding {padding} does not fit input {h}x{w}: output would be {ep}x{eq}"
        )
    if (p, q) != (ep, eq):
        raise check.InputError(
            f"grad has spatial size {p}x{q}, but a {r}x{s} conv with stride {stride} and padding {padding} "
            f"of a {h}x{w} input gives {ep}x{eq}"
        )
    return dict(n=n, c=channels, h=h, w=w, k=k, r=r, s=s, stride=stride, padding=padding)


def _input_hw(input_size, n: int, c: int) -> tuple[int, int]:
    size = tuple(input_size) if not isinstance(input_size, int) else (input_size, input_size)
    if len(size) == 4:
        if size[:2] != (n, c):
            raise check.InputError(
                f"input_size {tuple(input_size)} does not match grad batch {n} and weight input channels {c}"
            )
        size = size[2:]
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise check.InputError(f"input_size must be (H, W) or (N, C, H, W) positive ints, got {input_size!r}")
    return size  # type: ignore[return-value]


def _dgrad(grad, weight, x_raw, coeffs, input_size, stride, padding, relu, acc_in=None, out=None):
    grad_args, prologue = _grad_operand(grad)
    weight = check.tensor(weight, "weight", 4)
    k, c, r, s = weight.shape
    n, gk = grad_args[0].shape[:2]
    if gk != k:
        raise check.InputError(
            f"grad has {gk} channels (shape {tuple(grad_args[0].shape)}) but weight has {k} output channels "
            f"(shape {tuple(weight.shape)})"
        )
    tensors = {"grad": grad_args[0], "weight": weight}
    ep_args = []
    if x_raw is not None:
        x_raw = check.tensor(x_raw, "x_raw", 4, channel_view=True)
        if tuple(x_raw.shape[:2]) != (n, c):
            raise check.InputError(
                f"x_raw has shape {tuple(x_raw.shape)}; expected batch {n} and {c} channels (the weight's input)"
            )
        input_size = x_raw.shape[2:]
        names = ("scale", "shift", "mean", "invstd") if relu else ("mean", "invstd")
        ct = _bn_forward_coeffs(coeffs, c, names)
        ep_args = [x_raw, *ct.values()]
        tensors.update(x_raw=x_raw, **ct)
    dtype = check.same_dtype(**tensors)
    params = _backward_geometry(grad_args, c, _input_hw(input_size, n, c), (r, s), stride, padding)
    g0 = grad_args[0]
    shape = (n, c, params["h"], params["w"])
    acc = {}
    if acc_in is not None:
        acc_in = check.tensor(acc_in, "accumulate", 4, channel_view=True)
        check.shape(acc_in, "accumulate", shape)
        check.same_dtype(accumulate=acc_in, x_raw=x_raw)
        ep_args.append(acc_in)
        acc = {"accumulate": True}
    if x_raw is None:
        outs = [buffers.empty_like(g0, shape)]
    else:
        first = _out(out, "out", shape, g0)
        if acc_in is not None and first.untyped_storage().data_ptr() == acc_in.untyped_storage().data_ptr():
            raise check.InputError("out shares memory with accumulate: the kernel reads one while writing the other")
        outs = [first, g0.new_empty((n, c)), g0.new_empty((n, c))]
    args = [*grad_args, weight, *ep_args, *outs]
    spec = KernelSpec.make(
        "conv2d_dgrad", **params, dtype=check.dtype_name(dtype), grad_prologue=prologue,
        epilogue_relu=relu if x_raw is not None else None, **acc, **_views(args),
    )
    kernel(spec)(*args)
    return outs[0] if x_raw is None else tuple(outs)


def conv2d_dgrad(grad, weight, input_size, stride=1, padding=0):
    """Data gradient of conv2d(x, weight): conv_transpose2d(grad, weight) at the input's size.

    grad: the gradient at the conv output (N, K, P, Q), a tensor or a ``DeferredGrad``.
    input_size: the conv input's (H, W) or (N, C, H, W); it settles the rows/columns a
    stride > 1 leaves uncovered (they get zero gradient). For the chain's first conv.
    """
    return _dgrad(grad, weight, None, None, input_size, stride, padding, None)


def conv2d_dgrad_bn_relu(grad, weight, x_raw, coeffs, stride=1, padding=0, relu=True, accumulate=None, out=None):
    """Data gradient with the epilogue of the BatchNorm(+ReLU) that produced the conv input.

    The conv read a = relu(x_raw*scale + shift) (``bn_relu_conv2d``); x_raw is the stored raw
    output of the previous conv and coeffs its forward ``BNCoefficients``. Computes
    da = conv_transpose2d(grad, weight), dz = da * [x_raw*scale + shift > 0] (dz = da with
    relu=False), and per (n, c) plane the partials of dbeta = sum dz and
    dgamma = sum dz*xhat. Returns (dz, tile_dbeta, tile_dgamma) for ``bn_backward_finalize``.

    accumulate (relu=True): a tensor shaped like x_raw; the first result is then
    accumulate + scale*dz (the input gradient with the coefficients held fixed, added to a
    running sum as a DenseNet block's backward does), written in the pass that forms dz, and dz
    is not stored. out: where the first result goes (a tensor or channel slice; new if None);
    it must not share memory with accumulate.
    """
    if x_raw is None:
        raise check.InputError("x_raw is required (use conv2d_dgrad for a conv without a BatchNorm before it)")
    if accumulate is not None and not relu:
        raise check.InputError("accumulate adds scale*dz and needs the BatchNorm's scale: relu=True only")
    return _dgrad(grad, weight, x_raw, coeffs, None, stride, padding, bool(relu), accumulate, out)


def _wgrad(grad, x, scale, shift, kernel_size, stride, padding, relu):
    grad_args, prologue = _grad_operand(grad)
    x = check.tensor(x, "x", 4, channel_view=True)
    n, c, h, w = x.shape
    if grad_args[0].shape[0] != n:
        raise check.InputError(
            f"grad has batch {grad_args[0].shape[0]} (shape {tuple(grad_args[0].shape)}) but x has {n} "
            f"(shape {tuple(x.shape)})"
        )
    tensors = {"grad": grad_args[0], "x": x}
    act = []
    if relu is not None:
        scale, shift = check.tensor(scale, "scale", 1), check.tensor(shift, "shift", 1)
        check.shape(scale, "scale", (c,))
        check.shape(shift, "shift", (c,))
        tensors.update(scale=scale, shift=shift)
        act = [scale, shift]
    dtype = check.same_dtype(**tensors)
    params = _backward_geometry(grad_args, c, (h, w), kernel_size, stride, padding)
    dw = x.new_empty((params["k"], c, params["r"], params["s"]))
    args = [*grad_args, x, *act, dw]
    spec = KernelSpec.make(
        "conv2d_wgrad", **params, dtype=check.dtype_name(dtype), grad_prologue=prologue, prologue_relu=relu,
        **_views(args),
    )
    kernel(spec)(*args)
    return dw


def conv2d_wgrad(grad, x, kernel_size, stride=1, padding=0):
    """Weight gradient of conv2d(x, w) for a plain input x: dw of shape (K, C, R, S).

    grad: the gradient at the conv output, a tensor or a ``DeferredGrad``; kernel_size:
    (R, S) or an int.
    """
    return _wgrad(grad, x, None, None, kernel_size, stride, padding, None)


def bn_relu_conv2d_wgrad(grad, x, scale, shift, kernel_size, stride=1, padding=0, relu=True):
    """Weight gradient of bn_relu_conv2d: the input relu(x*scale + shift), zero-padded after
    the ReLU, is recomputed from the stored raw x in the kernel's prologue."""
    return _wgrad(grad, x, scale, shift, kernel_size, stride, padding, bool(relu))


def bn_backward_finalize(tile_dbeta, tile_dgamma, tile_count: int, coeffs) -> BNGradCoefficients:
    """Training-mode BatchNorm backward, per channel, from the per-tile partials.

    coeffs: the forward ``BNCoefficients`` of this BatchNorm (scale, mean, invstd are used);
    tile_count: elements per tile (``tile_count(x_raw)``). Returns dgamma, dbeta (the
    parameter gradients; ignore them for affine=False) and c1, c2, c3 of the input gradient.
    """
    tile_dbeta = check.tensor(tile_dbeta, "tile_dbeta", 2)
    tile_dgamma = check.tensor(tile_dgamma, "tile_dgamma", 2)
    check.shape(tile_dgamma, "tile_dgamma", tuple(tile_dbeta.shape))
    tiles, channels = tile_dbeta.shape
    if not isinstance(tile_count, int) or isinstance(tile_count, bool) or tile_count < 1:
        raise check.InputError(f"tile_count must be a positive int, got {tile_count!r}")
    ct = _bn_forward_coeffs(coeffs, channels, ("scale", "mean", "invstd"))
    dtype = check.same_dtype(tile_dbeta=tile_dbeta, tile_dgamma=tile_dgamma, **ct)
    fn = kernel(KernelSpec.make(
        "bn_backward_finalize", num_tiles=tiles, channels=channels, tile_count=tile_count,
        dtype=check.dtype_name(dtype),
    ))
    out = [tile_dbeta.new_empty(channels) for _ in range(5)]
    fn(tile_dbeta, tile_dgamma, ct["scale"], ct["mean"], ct["invstd"], *out)
    return BNGradCoefficients(*out)


def bn_relu_backward_stats(da, x_raw, coeffs, relu=True):
    """Standalone BatchNorm(+ReLU) backward epilogue, for a BatchNorm whose output does not
    feed one of our convolutions.

    da: the gradient at the ReLU output (or at the BatchNorm output with relu=False); x_raw:
    the BatchNorm's raw input; coeffs: its forward ``BNCoefficients``. Returns
    (dz, tile_dbeta, tile_dgamma) as ``conv2d_dgrad_bn_relu`` does.
    """
    da = check.tensor(da, "da", 4)
    x_raw = check.tensor(x_raw, "x_raw", 4)
    check.shape(x_raw, "x_raw", tuple(da.shape))
    relu = bool(relu)
    names = ("scale", "shift", "mean", "invstd") if relu else ("mean", "invstd")
    ct = _bn_forward_coeffs(coeffs, da.shape[1], names)
    dtype = check.same_dtype(da=da, x_raw=x_raw, **ct)
    fn = kernel(KernelSpec.make("bn_backward_stats", shape=tuple(da.shape), dtype=check.dtype_name(dtype), relu=relu))
    dz, tile_dbeta, tile_dgamma = buffers.empty_like(da), da.new_empty(da.shape[:2]), da.new_empty(da.shape[:2])
    fn(da, x_raw, *ct.values(), dz, tile_dbeta, tile_dgamma)
    return dz, tile_dbeta, tile_dgamma


def bn_backward_dx(dz, x, grad_coeffs: BNGradCoefficients):
    """Standalone BatchNorm input gradient dx = c1*dz + c2*x + c3, materialized.

    For where the gradient does not go into one of our convolutions (which take a
    ``DeferredGrad`` instead), e.g. the chain's input is the output of a pooling layer.
    """
    d = bn_input_grad(dz, x, grad_coeffs)
    dx = buffers.empty_like(d.dz)
    args = [*d, dx]
    fn = kernel(KernelSpec.make("bn_backward_dx", shape=tuple(d.dz.shape), dtype=check.dtype_name(d.dz.dtype),
                                **_views(args)))
    fn(*args)
    return dx
