"""Backward convolutions with the BatchNorm sub-layers fused around them.

Forward chain (see ``conv2d_bn``): ``x_l = conv_l(a_{l-1})``, ``z_l = x_l*scale_l + shift_l``,
``a_l = relu(z_l)``, ``x_{l+1} = conv_{l+1}(a_l)``. Backward, per convolution:

data gradient (conv_transpose of the output gradient g with the weight w)::

    da[n, c, h, w] = sum_{k, r, s : h + ph = p*sh + r, w + pw = q*sw + s} g[n, k, p, q] * w[k, c, r, s]

  optional epilogue, the BatchNorm(+ReLU) of the previous layer (``x_raw`` is that layer's
  stored raw conv output, the input of this convolution before its prologue)::

    dz = da * [x_raw*scale + shift > 0]          (dz = da without the ReLU)
    tile_dbeta[n, c]  = sum_{h,w} dz
    tile_dgamma[n, c] = sum_{h,w} dz * (x_raw - mean)*invstd

weight gradient::

    dw[k, c, r, s] = sum_{n, p, q} g[n, k, p, q] * a_pad[n, c, p*sh + r, q*sw + s]

  with the activation optionally recomputed in a prologue, a = relu(x_raw*scale + shift),
  zero padding applied *after* the ReLU (as in ``conv2d_bn``).

Both take the gradient either as a plain tensor or through the **grad prologue**: the
gradient at this convolution's output, which is the input gradient of the BatchNorm that
follows it, is formed on the fly from that BatchNorm's dz and the stored raw output x::

    g = c1*dz + c2*x + c3            (per-channel c1, c2, c3 from ``bn_backward.finalize``)

The data gradient is written per output phase, so strides > 1 do no work on the zeros a
dilated gradient would hold: with ``h + ph = sh*u + v`` (u = (h+ph)//sh, v = (h+ph)%sh), the
taps that reach input row h are r = v + i*sh, i = 0..ceil(R/sh)-1, reading gradient row
p = u - i. The stage ``grad_pad`` holds the gradient with zero borders so every such p is in
range (rows outside 0..P-1 contribute 0, which also covers (H+2ph-R) not divisible by sh: the
last input rows then get zero gradient from the rows no output covers); ``weight_pad`` holds
w with zero taps for r >= R. Both are the identity, and inlined, for stride 1.
"""
from __future__ import annotations

from tvm import te, tirx

from .conv2d_bn import Conv2dGeometry, prologue, zero_pad


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class DgradLayout:
    """Index bookkeeping of the phase-decomposed data gradient, per spatial dimension."""

    def __init__(self, size: int, out: int, kernel: int, stride: int, pad: int):
        self.size, self.out, self.kernel, self.stride, self.pad = size, out, kernel, stride, pad
        self.taps = _ceil_div(kernel, stride)  # taps per phase
        self.blocks = _ceil_div(size, stride)  # positions per phase, h = blocks_index*stride + phase
        # Gradient row p is stored at p + offset; reads are at (h+pad)//stride - i + offset >= 0,
        # for h up to blocks*stride - 1 (positions past size-1 are computed in phase form, unused).
        self.offset = max(0, self.taps - 1 - pad // stride)
        self.padded = (self.blocks * stride - 1 + pad) // stride + self.offset + 1
        self.kernel_padded = self.taps * stride

    def grad_index(self, h, i):
        """Gradient row read by tap i of input row h."""
        return tirx.floordiv(h + self.pad, self.stride) - i + self.offset

    def tap_index(self, h, i):
        """Weight row of tap i of input row h."""
        return tirx.floormod(h + self.pad, self.stride) + i * self.stride

    def phase_grad_index(self, t, u, i):
        """grad_index of position h = u*stride + t: affine in u, for vectors along u."""
        return u + tirx.floordiv(t + self.pad, self.stride) - i + self.offset

    def phase_tap_index(self, t, i):
        """tap_index of position h = u*stride + t: the same for every u of phase t."""
        return tirx.floormod(t + self.pad, self.stride) + i * self.stride


def grad_prologue(dz: te.Tensor, x: te.Tensor, c1: te.Tensor, c2: te.Tensor, c3: te.Tensor) -> te.Tensor:
    """Stage ``grad``: the BatchNorm input gradient c1*dz + c2*x + c3, per channel."""
    return te.compute(
        dz.shape, lambda n, k, p, q: c1[k] * dz[n, k, p, q] + c2[k] * x[n, k, p, q] + c3[k], name="grad"
    )


def grad_input(geo: Conv2dGeometry, dtype: str, grad_prologue_: bool) -> tuple[list, te.Tensor]:
    """The gradient at the conv output: placeholder ``grad`` or the grad prologue.

    Returns (arguments, tensor): [grad] or [dz, x, c1, c2, c3].
    """
    if not grad_prologue_:
        g = te.placeholder(geo.out_shape, dtype, "grad")
        return [g], g
    dz = te.placeholder(geo.out_shape, dtype, "dz")
    x = te.placeholder(geo.out_shape, dtype, "x")
    c1, c2, c3 = (te.placeholder((geo.k,), dtype, name) for name in ("c1", "c2", "c3"))
    return [dz, x, c1, c2, c3], grad_prologue(dz, x, c1, c2, c3)


def grad_pad(g: te.Tensor, rows: DgradLayout, cols: DgradLayout) -> te.Tensor:
    """Stage ``grad_pad``: the gradient with the zero borders the phase-wise taps read."""
    n, k, p, q = (int(d) for d in g.shape)
    zero = tirx.const(0, g.dtype)
    oh, ow = rows.offset, cols.offset

    def f(i, j, y, x):
        inside = tirx.all(y >= oh, y < p + oh, x >= ow, x < q + ow)
        return tirx.if_then_else(inside, g[i, j, y - oh, x - ow], zero)

    return te.compute((n, k, rows.padded, cols.padded), f, name="grad_pad")


def weight_pad(w: te.Tensor, rows: DgradLayout, cols: DgradLayout) -> te.Tensor:
    """Stage ``weight_pad``: w with zero taps up to a whole number of taps per phase.

    Absent (w itself) when every phase has the same number of taps (e.g. stride 1).
    """
    k, c, r, s = (int(d) for d in w.shape)
    if (rows.kernel_padded, cols.kernel_padded) == (r, s):
        return w
    zero = tirx.const(0, w.dtype)

    def f(i, j, y, x):
        return tirx.if_then_else(tirx.all(y < r, x < s), w[i, j, y, x], zero)

    return te.compute((k, c, rows.kernel_padded, cols.kernel_padded), f, name="weight_pad")


def dgrad_nchw(g_pad: te.Tensor, w_pad: te.Tensor, geo: Conv2dGeometry, rows: DgradLayout, cols: DgradLayout):
    """Stages ``dgrad`` and ``da``: da = conv_transpose(g, w), one phase's taps per position.

    ``dgrad`` holds the columns phase-major, dgrad[n, c, h, t, u] = da[n, c, h, u*sw + t], so a
    vector along u reads consecutive gradient columns with one weight tap per phase (a vector
    along w of a strided conv would mix phases). ``da`` is the NCHW view of it.
    """
    rk = te.reduce_axis((0, geo.k), "rk")
    ri = te.reduce_axis((0, rows.taps), "ri")
    rj = te.reduce_axis((0, cols.taps), "rj")
    sw = cols.stride
    dgrad = te.compute(
        (geo.n, geo.c, geo.h, sw, cols.blocks),
        lambda n, c, h, t, u: te.sum(
            g_pad[n, rk, rows.grad_index(h, ri), cols.phase_grad_index(t, u, rj)]
            * w_pad[rk, c, rows.tap_index(h, ri), cols.phase_tap_index(t, rj)],
            axis=[rk, ri, rj],
        ),
        name="dgrad",
    )
    return te.compute(
        (geo.n, geo.c, geo.h, geo.w),
        lambda n, c, h, w: dgrad[n, c, h, tirx.floormod(w, sw), tirx.floordiv(w, sw)],
        name="da",
    )


def relu_backward(da: te.Tensor, x: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None) -> te.Tensor:
    """Stage ``dz``: da * [x*scale + shift > 0], or da itself when scale is None (no ReLU)."""
    zero = tirx.const(0, da.dtype)
    if scale is None:
        return te.compute(da.shape, lambda n, c, h, w: da[n, c, h, w], name="dz")

    def f(n, c, h, w):
        return tirx.Select(x[n, c, h, w] * scale[c] + shift[c] > zero, da[n, c, h, w], zero)

    return te.compute(da.shape, f, name="dz")


def plane_grad_stats(dz: te.Tensor, x: te.Tensor, mean: te.Tensor, invstd: te.Tensor):
    """Stages ``tile_dbeta`` and ``tile_dgamma``: per (n, c) plane sums of dz and dz*xhat."""
    n, c, h, w = (int(d) for d in dz.shape)
    rh = te.reduce_axis((0, h), "rh")
    rw = te.reduce_axis((0, w), "rw")
    dbeta = te.compute((n, c), lambda i, j: te.sum(dz[i, j, rh, rw], axis=[rh, rw]), name="tile_dbeta")
    rh2 = te.reduce_axis((0, h), "rh2")
    rw2 = te.reduce_axis((0, w), "rw2")
    dgamma = te.compute(
        (n, c),
        lambda i, j: te.sum(dz[i, j, rh2, rw2] * ((x[i, j, rh2, rw2] - mean[j]) * invstd[j]), axis=[rh2, rw2]),
        name="tile_dgamma",
    )
    return dbeta, dgamma


def epilogue_inputs(shape, dtype: str, relu: bool) -> dict:
    """Placeholders of the BatchNorm epilogue: x_raw, [scale, shift], mean, invstd."""
    c = shape[1]
    t = {"x_raw": te.placeholder(shape, dtype, "x_raw")}
    if relu:
        t["scale"] = te.placeholder((c,), dtype, "scale")
        t["shift"] = te.placeholder((c,), dtype, "shift")
    t["mean"] = te.placeholder((c,), dtype, "mean")
    t["invstd"] = te.placeholder((c,), dtype, "invstd")
    return t


def bn_relu_backward(da: te.Tensor, ep: dict) -> list:
    """The epilogue stages on a data gradient: [dz, tile_dbeta, tile_dgamma]."""
    dz = relu_backward(da, ep["x_raw"], ep.get("scale"), ep.get("shift"))
    return [dz, *plane_grad_stats(dz, ep["x_raw"], ep["mean"], ep["invstd"])]


def conv2d_dgrad(geo: Conv2dGeometry, dtype: str, grad_prologue_: bool, epilogue_relu: bool | None):
    """The data-gradient convolution of a restructured chain.

    geo is the *forward* convolution's geometry (input n, c, h, w; weight k, c, r, s).
    grad_prologue_: the gradient is c1*dz + c2*x + c3 (the following BatchNorm's backward)
    rather than a plain tensor.
    epilogue_relu: None for the plain data gradient; True/False for the epilogue of the
    BatchNorm (with/without ReLU) whose output this convolution read.

    Arguments, inputs then outputs:
    [grad | dz, x, c1, c2, c3], w, [x_raw, [scale, shift], mean, invstd],
    then da, or dz_in, tile_dbeta, tile_dgamma.
    """
    args, g = grad_input(geo, dtype, grad_prologue_)
    w = te.placeholder((geo.k, geo.c, geo.r, geo.s), dtype, "w")
    args.append(w)
    rows = DgradLayout(geo.h, geo.p, geo.r, geo.stride[0], geo.padding[0])
    cols = DgradLayout(geo.w, geo.q, geo.s, geo.stride[1], geo.padding[1])
    da = dgrad_nchw(grad_pad(g, rows, cols), weight_pad(w, rows, cols), geo, rows, cols)
    if epilogue_relu is None:
        return args + [da]
    ep = epilogue_inputs((geo.n, geo.c, geo.h, geo.w), dtype, epilogue_relu)
    return args + list(ep.values()) + bn_relu_backward(da, ep)


def wgrad_nchw(g: te.Tensor, a_pad: te.Tensor, geo: Conv2dGeometry) -> te.Tensor:
    """Stage ``wgrad``: dw[k, c, r, s] = sum_{n,p,q} g[n,k,p,q] * a_pad[n, c, p*sh+r, q*sw+s]."""
    rn = te.reduce_axis((0, geo.n), "rn")
    rp = te.reduce_axis((0, geo.p), "rp")
    rq = te.reduce_axis((0, geo.q), "rq")
    sh, sw = geo.stride
    return te.compute(
        (geo.k, geo.c, geo.r, geo.s),
        lambda k, c, r, s: te.sum(
            g[rn, k, rp, rq] * a_pad[rn, c, rp * sh + r, rq * sw + s], axis=[rn, rp, rq]
        ),
        name="wgrad",
    )


def conv2d_wgrad(geo: Conv2dGeometry, dtype: str, grad_prologue_: bool, prologue_relu: bool | None):
    """The weight-gradient convolution of a restructured chain.

    grad_prologue_: as in ``conv2d_dgrad``.
    prologue_relu: None when the conv read a plain input (the chain's first conv); True/False
    to recompute its input a = relu(x*scale + shift) (or without ReLU) from the previous
    layer's raw output, with zero padding after the prologue.

    Arguments: [grad | dz, x, c1, c2, c3], x_in, [scale, shift], output dw.
    """
    args, g = grad_input(geo, dtype, grad_prologue_)
    x_in = te.placeholder((geo.n, geo.c, geo.h, geo.w), dtype, "x_in")
    args.append(x_in)
    a = x_in
    if prologue_relu is not None:
        scale = te.placeholder((geo.c,), dtype, "scale")
        shift = te.placeholder((geo.c,), dtype, "shift")
        args += [scale, shift]
        a = prologue(x_in, scale, shift, prologue_relu)
    return args + [wgrad_nchw(g, zero_pad(a, geo.padding), geo)]
