"""Forward convolution with the BatchNorm sub-layers fused around it.

    y = conv2d(pad(prologue(x)), w)          prologue: z = x*scale + shift, a = relu(z)
    tile_sum[n, k] = sum_{p,q} y[n, k, p, q]
    tile_m2[n, k]  = sum_{p,q} (y[n, k, p, q] - tile_sum[n, k] / (P*Q))^2

The statistics tile is one (n, k) output plane. Each tile's sum of squared deviations is
taken around its own mean (two passes over a plane that is still in cache), so the merge in
``bn.finalize`` (Chan's parallel formula) stays accurate when |mean| >> std; no E[x^2]-E[x]^2.

Padding is applied *after* the prologue: padded positions are 0, as in the original graph
where the post-ReLU activation is zero-padded, not relu(shift).
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx


@dataclass(frozen=True)
class Conv2dGeometry:
    """Static shape of a convolution: NCHW input, KCRS weight, dilation 1, groups 1."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def p(self) -> int:
        return (self.h + 2 * self.padding[0] - self.r) // self.stride[0] + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.padding[1] - self.s) // self.stride[1] + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.k, self.p, self.q)

    @property
    def flops(self) -> int:
        return 2 * self.n * self.k * self.p * self.q * self.c * self.r * self.s


def prologue(x: te.Tensor, scale: te.Tensor, shift: te.Tensor, relu: bool) -> te.Tensor:
    """Stage ``act``: BatchNorm apply (per-channel scale/shift) and optional ReLU."""
    zero = tirx.const(0, x.dtype)

    def f(n, c, h, w):
        z = x[n, c, h, w] * scale[c] + shift[c]
        return te.max(z, zero) if relu else z

    return te.compute(x.shape, f, name="act")


def zero_pad(a: te.Tensor, padding: tuple[int, int]) -> te.Tensor:
    """Stage ``pad``: zeros outside the image (identity when padding is 0)."""
    ph, pw = padding
    n, c, h, w = (int(d) for d in a.shape)
    zero = tirx.const(0, a.dtype)

    def f(i, j, y, x):
        inside = tirx.all(y >= ph, y < h + ph, x >= pw, x < w + pw)
        return tirx.if_then_else(inside, a[i, j, y - ph, x - pw], zero)

    return te.compute((n, c, h + 2 * ph, w + 2 * pw), f, name="pad")


def conv2d_nchw(a_pad: te.Tensor, w: te.Tensor, geo: Conv2dGeometry) -> te.Tensor:
    """Stage ``conv``: direct convolution of an already padded input."""
    rc = te.reduce_axis((0, geo.c), "rc")
    rr = te.reduce_axis((0, geo.r), "rr")
    rs = te.reduce_axis((0, geo.s), "rs")
    sh, sw = geo.stride
    return te.compute(
        geo.out_shape,
        lambda n, k, p, q: te.sum(
            a_pad[n, rc, p * sh + rr, q * sw + rs] * w[k, rc, rr, rs], axis=[rc, rr, rs]
        ),
        name="conv",
    )


def plane_stats(y: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """Stages ``tile_sum`` and ``tile_m2``: per (n, k) plane sum and centred sum of squares."""
    n, k, p, q = (int(d) for d in y.shape)
    inv_count = tirx.const(1.0 / (p * q), y.dtype)
    rp = te.reduce_axis((0, p), "rp")
    rq = te.reduce_axis((0, q), "rq")
    tile_sum = te.compute((n, k), lambda i, j: te.sum(y[i, j, rp, rq], axis=[rp, rq]), name="tile_sum")
    rp2 = te.reduce_axis((0, p), "rp2")
    rq2 = te.reduce_axis((0, q), "rq2")

    def m2(i, j):
        d = y[i, j, rp2, rq2] - tile_sum[i, j] * inv_count
        return te.sum(d * d, axis=[rp2, rq2])

    return tile_sum, te.compute((n, k), m2, name="tile_m2")


def conv2d_fused(geo: Conv2dGeometry, dtype: str, prologue_relu: bool | None, stats: bool):
    """The forward convolution of a restructured chain.

    prologue_relu: None for no prologue (the chain's first conv reads a plain input);
    True/False for the BatchNorm-apply prologue with/without ReLU.
    stats: add the statistics epilogue for the BatchNorm that follows.

    Returns the kernel's argument list, inputs then outputs:
    x, [scale, shift], w, y, [tile_sum, tile_m2].
    """
    x = te.placeholder((geo.n, geo.c, geo.h, geo.w), dtype, "x")
    w = te.placeholder((geo.k, geo.c, geo.r, geo.s), dtype, "w")
    args = [x]
    a = x
    if prologue_relu is not None:
        scale = te.placeholder((geo.c,), dtype, "scale")
        shift = te.placeholder((geo.c,), dtype, "shift")
        args += [scale, shift]
        a = prologue(x, scale, shift, prologue_relu)
    y = conv2d_nchw(zero_pad(a, geo.padding), w, geo)
    args += [w, y]
    if stats:
        args += list(plane_stats(y))
    return args
