"""BatchNorm apply (+ReLU) fused into the max pool that reads it (a ResNet/DenseNet stem).

Forward, from the raw conv output y and the BatchNorm's per-channel (scale, shift)::

    a = relu(y*scale + shift)                                   (or without the ReLU)
    pool[n, c, p, q], tap[n, c, p, q] = max, first argmax over the window's in-image positions

the window of (p, q) being rows p*sh - ph + i, columns q*sw - pw + j (i < kh, j < kw), and
``tap`` = i*kw + j of the first position (row-major) holding the maximum, as PyTorch's
max_pool2d picks it; positions outside the image never win. The x86 template computes ``a`` plane
by plane in cache (stage ``act_pad``): it never goes to main memory.

Backward, given the pooled gradient ``dpool``: an input position (h, w) gets the gradient of
every window whose tap points at it (at most ceil(kh/sh)*ceil(kw/sw) windows contain it),
masked by the ReLU (a > 0), and reduced per (n, c) plane into the BatchNorm partials::

    dz = [a > 0] * sum_{windows (p, q) of (h, w) with tap[n, c, p, q] at (h, w)} dpool[n, c, p, q]
    grad_y = scale*dz,  tile_dbeta = sum_{h,w} dz,  tile_dgamma = sum_{h,w} dz*(y - mean)*invstd

one pass over (dpool, tap, y). The windows of a position are a stride-phased data gradient's
taps (``conv2d_bn_backward.DgradLayout``); near the borders some lie outside 0..p-1 x 0..q-1,
so the backward reads (dpool, tap) through padded copies as the data gradient reads its
gradient (``grad_pad``: ``dpool_pad`` 0 and ``tap_pad`` -1 outside, a tap no window has):
every load is in bounds whatever the condition around it. TIR's Select evaluates both branches, and the simplifier drops an index
clamp it can prove from the Select's condition: a clamped load under a range condition read
up to a row before and after the tensor, and crashed when that memory was unmapped.

Stage names: ``act_pad`` (the applied plane, -inf in the padding, so that padding never wins),
``pool`` (forward); ``dpool_pad``, ``tap_pad``, ``dz``,
``grad_y``, ``tile_dbeta``, ``tile_dgamma`` (backward, the residual backward's names: the same
template schedules both).

The average pool over non-overlapping windows (kernel = stride, no padding, floor mode: a
DenseNet transition's 2x2 pool, once the bridge has moved it before the transition's 1x1
conv) reads the applied activation once, so nothing is staged::

    pool[n, c, p, q] = sum_{i < kh, j < kw} relu(y*scale + shift)[n, c, p*kh + i, q*kw + j] / (kh*kw)
    dz[n, c, h, w] = [a > 0] * dpool[n, c, h // kh, w // kw] / (kh*kw)     (0 in the rows and
                     columns floor mode drops: read from the zero border of ``dpool_pad``)

Each term is scaled before the sum, exactly PyTorch's result for power-of-two windows (2x2).
Stage names: ``avg_pool`` (forward, the applied activation inlined); [``dpool_pad``], ``dz``,
``grad_y``, ``tile_dbeta``, ``tile_dgamma`` (backward, the residual backward's template again).
"""
from __future__ import annotations

from tvm import te, tirx

from .conv2d_bn_backward import DgradLayout, grad_pad
from .residual import _plane_sum


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _first_max():
    """(value, tap) reducer: the accumulated pair stays unless the new value is strictly larger."""

    def combine(lhs, rhs):
        take = rhs[0] > lhs[0]
        return tirx.Select(take, rhs[0], lhs[0]), tirx.Select(take, rhs[1], lhs[1])

    def identity(value_dtype, tap_dtype):
        return tirx.min_value(value_dtype), tirx.const(-1, tap_dtype)

    return te.comm_reducer(combine, identity, name="first_max")


def bn_relu_maxpool(shape: tuple[int, int, int, int], dtype: str, relu: bool, kernel: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int]):
    """Arguments: y, scale, shift, outputs pool, tap (int32)."""
    n, c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    p, q = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y = te.placeholder(shape, dtype, "y")
    scale, shift = te.placeholder((c,), dtype, "scale"), te.placeholder((c,), dtype, "shift")
    zero = tirx.const(0, dtype)

    def act_pad(b, k, row, col):
        inside = tirx.all(row >= ph, row < h + ph, col >= pw, col < w + pw)
        z = y[b, k, row - ph, col - pw] * scale[k] + shift[k]
        return tirx.if_then_else(inside, te.max(z, zero) if relu else z, tirx.min_value(dtype))

    a_pad = te.compute((n, c, h + 2 * ph, w + 2 * pw), act_pad, name="act_pad")
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    first_max = _first_max()

    def f(b, k, i, j):
        return first_max((a_pad[b, k, i * sh + ri, j * sw + rj], ri * kw + rj), axis=[ri, rj])

    pool, tap = te.compute((n, c, p, q), f, name="pool")
    return [y, scale, shift, pool, tap]


def bn_relu_maxpool_backward(shape: tuple[int, int, int, int], dtype: str, relu: bool, kernel: tuple[int, int],
                             stride: tuple[int, int], padding: tuple[int, int]):
    """Arguments: dpool, tap, y, scale, shift, mean, invstd, outputs grad_y, tile_dbeta,
    tile_dgamma. ``shape`` is the pool input's (that of y)."""
    n, c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    p, q = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    dpool = te.placeholder((n, c, p, q), dtype, "dpool")
    tap = te.placeholder((n, c, p, q), "int32", "tap")
    y = te.placeholder(shape, dtype, "y")
    scale, shift, mean, invstd = (te.placeholder((c,), dtype, name) for name in ("scale", "shift", "mean", "invstd"))
    zero = tirx.const(0, dtype)
    # a window is a data gradient's tap: the dgrad's index bookkeeping and padded gradient
    rows, cols = DgradLayout(h, p, kh, sh, ph), DgradLayout(w, q, kw, sw, pw)
    dpool_pad = grad_pad(dpool, rows, cols, name="dpool_pad")
    tap_pad = grad_pad(tap, rows, cols, tirx.const(-1, "int32"), "tap_pad")

    def gathered(b, k, row, col):
        # windows containing (row, col): p = (row + ph)//sh - i for i < ceil(kh/sh), while the
        # window still reaches the row (its tap row (row + ph)%sh + i*sh < kh); windows outside
        # the output have tap -1 in tap_pad, which never matches
        total = zero
        for i in range(rows.taps):
            for j in range(cols.taps):
                at = (b, k, rows.grad_index(row, i), cols.grad_index(col, j))
                ti, tj = rows.tap_index(row, i), cols.tap_index(col, j)
                hit = tirx.all(ti < kh, tj < kw, tap_pad[at] == ti * kw + tj)
                total = total + tirx.Select(hit, dpool_pad[at], zero)
        return total

    return [dpool, tap, y, scale, shift, mean, invstd, *_masked_backward(gathered, y, scale, shift, mean, invstd, relu)]


def _masked_backward(gathered, y, scale, shift, mean, invstd, relu: bool) -> list:
    """Stages ``dz`` (the pooled gradient reaching each input position, `gathered`, masked by
    the ReLU), ``grad_y`` = scale*dz and the BatchNorm partials ``tile_dbeta``, ``tile_dgamma``."""
    shape = tuple(int(d) for d in y.shape)
    zero = tirx.const(0, y.dtype)

    def dz_f(b, k, row, col):
        g = gathered(b, k, row, col)
        if not relu:
            return g
        return tirx.Select(y[b, k, row, col] * scale[k] + shift[k] > zero, g, zero)

    dz = te.compute(shape, dz_f, name="dz")
    grad_y = te.compute(shape, lambda b, k, i, j: scale[k] * dz[b, k, i, j], name="grad_y")
    dbeta = _plane_sum(shape, lambda b, k, i, j: dz[b, k, i, j], "tile_dbeta")
    dgamma = _plane_sum(shape, lambda b, k, i, j: dz[b, k, i, j] * ((y[b, k, i, j] - mean[k]) * invstd[k]),
                        "tile_dgamma")
    return [grad_y, dbeta, dgamma]


def bn_relu_avgpool(shape: tuple[int, int, int, int], dtype: str, relu: bool, kernel: tuple[int, int]):
    """Arguments: y, scale, shift, outputs pool (stride = kernel, no padding, floor mode)."""
    n, c, h, w = shape
    kh, kw = kernel
    y = te.placeholder(shape, dtype, "y")
    scale, shift = te.placeholder((c,), dtype, "scale"), te.placeholder((c,), dtype, "shift")
    inv = tirx.const(1.0 / (kh * kw), dtype)
    zero = tirx.const(0, dtype)
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")

    def f(b, k, i, j):
        z = y[b, k, i * kh + ri, j * kw + rj] * scale[k] + shift[k]
        return te.sum((te.max(z, zero) if relu else z) * inv, axis=[ri, rj])

    pool = te.compute((n, c, h // kh, w // kw), f, name="avg_pool")
    return [y, scale, shift, pool]


def bn_relu_avgpool_backward(shape: tuple[int, int, int, int], dtype: str, relu: bool, kernel: tuple[int, int]):
    """Arguments: dpool, y, scale, shift, mean, invstd, outputs grad_y, tile_dbeta, tile_dgamma.
    ``shape`` is the pool input's (that of y)."""
    n, c, h, w = shape
    kh, kw = kernel
    p, q = h // kh, w // kw
    dpool = te.placeholder((n, c, p, q), dtype, "dpool")
    y = te.placeholder(shape, dtype, "y")
    scale, shift, mean, invstd = (te.placeholder((c,), dtype, name) for name in ("scale", "shift", "mean", "invstd"))
    inv = tirx.const(1.0 / (kh * kw), dtype)

    # floor mode leaves the last rows / columns outside every window when the kernel does not
    # divide the plane: they read a zero border of a padded copy (``dpool_pad``, the max
    # pool's), so every load is in bounds and no condition guards one
    rows, cols = DgradLayout(h, p, kh, kh, 0), DgradLayout(w, q, kw, kw, 0)
    source = dpool if (rows.padded, cols.padded) == (p, q) else grad_pad(dpool, rows, cols, name="dpool_pad")

    def gathered(b, k, row, col):
        return source[b, k, rows.grad_index(row, 0), cols.grad_index(col, 0)] * inv

    return [dpool, y, scale, shift, mean, invstd, *_masked_backward(gathered, y, scale, shift, mean, invstd, relu)]
