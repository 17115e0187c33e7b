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

  and optionally, for a running sum of input gradients (a DenseNet block's buffer), the
  output acc = acc_in + scale*dz in place of dz (``accumulate``)

weight gradient::

    dw[k, c, r, s] = sum_{n, p, q} g[n, k, p, q] * a_pad[n, c, p*sh + r, q*sw + s]

  with the activation optionally recomputed in a prologue, a = relu(x_raw*scale + shift),
  zero padding applied *after* the ReLU (as in ``conv2d_bn``).

Both take the gradient either as a plain tensor or through the **grad prologue**: the
gradient at this convolution's output, which is the input gradient of the BatchNorm that
follows it, is formed on the fly from that BatchNorm's dz and the stored raw output x::

    g = c1*dz + c2*x + c3            (per-channel c1, c2, c3 from ``bn_backward.finalize``)

The data gradient is computed per stride phase, so strides > 1 do no work on the zeros a
dilated gradient would hold, nor on taps a phase does not have: input row h = sh*u + a (phase
a = h % sh) is reached by the taps r = r0 + i*sh with r0 = (a + ph) % sh, i = 0..T(a)-1,
T(a) = ceil((R - r0)/sh) (0 when r0 >= R), reading gradient row p = u + (a + ph)//sh - i; the
same for columns. One stage ``dgrad_{a}_{b}`` per phase pair (a, b) with T(a)*T(b) > 0, over
u = 0..ceil(H/sh)-1 and v = 0..ceil(W/sw)-1 (positions past H-1 / W-1 are computed and not
used), reduces over (k, i, j) with exactly its own taps; ``da`` gathers the phases into NCHW
(0 where a phase has no taps). For stride 1 the one stage is named ``dgrad`` and ``da`` is its
copy. The stage ``grad_pad`` holds the gradient with zero borders so every row p read is in
range (rows outside 0..P-1 contribute 0, which also covers (H+2ph-R) not divisible by sh: the
last input rows then get zero gradient from the rows no output covers); it is the identity
for stride 1 without padding.
"""
from __future__ import annotations

from dataclasses import replace

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

    def phase_taps(self, t: int) -> int:
        """Taps that reach the positions of phase t (python int; 0 when none does)."""
        first = (t + self.pad) % self.stride
        return max(0, _ceil_div(self.kernel - first, self.stride))


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


def grad_pad(g: te.Tensor, rows: DgradLayout, cols: DgradLayout, fill=None, name: str = "grad_pad") -> te.Tensor:
    """Stage `name`: g with the borders the phase-wise taps read, `fill` there (default 0).
    Row p of g is at p + rows.offset (``grad_index``)."""
    n, k, p, q = (int(d) for d in g.shape)
    fill = tirx.const(0, g.dtype) if fill is None else fill
    oh, ow = rows.offset, cols.offset

    def f(i, j, y, x):
        inside = tirx.all(y >= oh, y < p + oh, x >= ow, x < q + ow)
        return tirx.if_then_else(inside, g[i, j, y - oh, x - ow], fill)

    return te.compute((n, k, rows.padded, cols.padded), f, name=name)


def _phase_sum(g_pad, w, rows: DgradLayout, cols: DgradLayout, a: int, b: int, rk, ri, rj):
    """fcompute of phase (a, b): the taps reaching rows u*sh + a and columns v*sw + b."""

    def f(n, c, u, v):
        return te.sum(
            g_pad[n, rk, rows.phase_grad_index(a, u, ri), cols.phase_grad_index(b, v, rj)]
            * w[rk, c, rows.phase_tap_index(a, ri), cols.phase_tap_index(b, rj)],
            axis=[rk, ri, rj],
        )

    return f


def dgrad_phases(g_pad: te.Tensor, w: te.Tensor, geo: Conv2dGeometry, rows: DgradLayout, cols: DgradLayout):
    """Stages ``dgrad`` (stride 1) or ``dgrad_{a}_{b}`` (one per phase pair with taps), and
    ``da``, their NCHW view: da[n, c, u*sh + a, v*sw + b] = dgrad_{a}_{b}[n, c, u, v]."""
    strided = (rows.stride, cols.stride) != (1, 1)
    phases = {}
    for a in range(rows.stride):
        for b in range(cols.stride):
            th, tw = rows.phase_taps(a), cols.phase_taps(b)
            if th == 0 or tw == 0:
                continue
            rk = te.reduce_axis((0, geo.k), "rk")
            ri = te.reduce_axis((0, th), "ri")
            rj = te.reduce_axis((0, tw), "rj")

            name = f"dgrad_{a}_{b}" if strided else "dgrad"
            phases[(a, b)] = te.compute((geo.n, geo.c, rows.blocks, cols.blocks),
                                        _phase_sum(g_pad, w, rows, cols, a, b, rk, ri, rj), name=name)
    sh, sw = rows.stride, cols.stride
    zero = tirx.const(0, w.dtype)

    def gather(n, c, h, x):
        if not strided:
            return phases[(0, 0)][n, c, h, x]
        u, v = tirx.floordiv(h, sh), tirx.floordiv(x, sw)
        a, b = tirx.floormod(h, sh), tirx.floormod(x, sw)
        out = zero
        for (pa, pb), d in phases.items():
            out = tirx.if_then_else(tirx.all(a == pa, b == pb), d[n, c, u, v], out)
        return out

    return te.compute((geo.n, geo.c, geo.h, geo.w), gather, name="da")


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


def accumulate_scaled(acc_in: te.Tensor, dz: te.Tensor, scale: te.Tensor) -> te.Tensor:
    """Stage ``acc``: acc_in + scale*dz, per channel: the gradient at the BatchNorm's input with
    its coefficients held fixed, added to a running sum (a DenseNet block's buffer gradient)."""
    return te.compute(dz.shape, lambda n, c, h, w: acc_in[n, c, h, w] + scale[c] * dz[n, c, h, w], name="acc")


def conv2d_dgrad(geo: Conv2dGeometry, dtype: str, grad_prologue_: bool, epilogue_relu: bool | None,
                 accumulate: bool = False):
    """The data-gradient convolution of a restructured chain.

    geo is the *forward* convolution's geometry (input n, c, h, w; weight k, c, r, s).
    grad_prologue_: the gradient is c1*dz + c2*x + c3 (the following BatchNorm's backward)
    rather than a plain tensor.
    epilogue_relu: None for the plain data gradient; True/False for the epilogue of the
    BatchNorm (with/without ReLU) whose output this convolution read.
    accumulate: (epilogue with ReLU only) the output is acc_in + scale*dz (``accumulate_scaled``)
    instead of dz, which is then only an intermediate stage: the sum is written in the pass
    that forms dz, and dz itself never goes to memory.

    Arguments, inputs then outputs:
    [grad | dz, x, c1, c2, c3], w, [x_raw, [scale, shift], mean, invstd, [acc_in]],
    then da, or dz | acc, tile_dbeta, tile_dgamma.
    """
    args, g = grad_input(geo, dtype, grad_prologue_)
    w = te.placeholder((geo.k, geo.c, geo.r, geo.s), dtype, "w")
    args.append(w)
    rows = DgradLayout(geo.h, geo.p, geo.r, geo.stride[0], geo.padding[0])
    cols = DgradLayout(geo.w, geo.q, geo.s, geo.stride[1], geo.padding[1])
    da = dgrad_phases(grad_pad(g, rows, cols), w, geo, rows, cols)
    if epilogue_relu is None:
        return args + [da]
    ep = epilogue_inputs((geo.n, geo.c, geo.h, geo.w), dtype, epilogue_relu)
    dz, tile_dbeta, tile_dgamma = bn_relu_backward(da, ep)
    if not accumulate:
        return args + list(ep.values()) + [dz, tile_dbeta, tile_dgamma]
    if not epilogue_relu:
        raise ValueError("accumulate needs the epilogue's BatchNorm scale: epilogue_relu=True")
    acc_in = te.placeholder((geo.n, geo.c, geo.h, geo.w), dtype, "acc_in")
    return args + list(ep.values()) + [acc_in, accumulate_scaled(acc_in, dz, ep["scale"]), tile_dbeta, tile_dgamma]


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
    if (geo.r, geo.s) == (1, 1) and geo.padding == (0, 0) and geo.stride != (1, 1):
        # a strided 1x1 conv reads only every stride-th row and column: its operand stage is
        # that subsample, and the rest is a stride-1 1x1 weight gradient over it
        return args + [wgrad_nchw(g, subsample(a, geo), replace(geo, h=geo.p, w=geo.q, stride=(1, 1)))]
    return args + [wgrad_nchw(g, zero_pad(a, geo.padding), geo)]


def subsample(a: te.Tensor, geo: Conv2dGeometry) -> te.Tensor:
    """Stage ``pad`` of a strided 1x1 convolution without padding: the input positions it
    reads, a[n, c, p*sh, q*sw] (with the prologue, when there is one, applied to those only)."""
    sh, sw = geo.stride
    return te.compute((geo.n, geo.c, geo.p, geo.q), lambda n, c, p, q: a[n, c, p * sh, q * sw], name="pad")
