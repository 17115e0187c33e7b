"""Per-channel BatchNorm backward sub-layers that stand outside a convolution.

finalize   merges the per-tile partials of dbeta = sum dz and dgamma = sum dz*xhat and forms
           the coefficients of the input gradient, dx = c1*dz + c2*x + c3 (x the raw input
           of the BatchNorm), with m = N*H*W elements per channel:

               c1 = scale = gamma*invstd
               c2 = -scale*invstd*dgamma/m
               c3 = -scale*dbeta/m - c2*mean

           (from dx = scale*(dz - dbeta/m - xhat*dgamma/m), xhat = (x - mean)*invstd).
stats      the dgrad epilogue as a standalone kernel, for a BatchNorm(+ReLU) whose output
           feeds something that is not one of our convolutions: given da, the gradient at the
           ReLU output (or the BatchNorm output), writes dz and the per-plane partials.
dx         the grad prologue as a standalone kernel: dx = c1*dz + c2*x + c3.
"""
from __future__ import annotations

from tvm import te, tirx

from .conv2d_bn_backward import bn_relu_backward, epilogue_inputs, grad_prologue


def finalize(num_tiles: int, channels: int, tile_count: int, dtype: str):
    """Stages ``dbeta``, ``dgamma`` (sums over tiles, in tile order), ``c1``, ``c2``, ``c3``.

    Arguments: tile_dbeta, tile_dgamma, scale, mean, invstd, outputs dgamma, dbeta, c1, c2, c3.
    """
    m = num_tiles * tile_count
    shape = (num_tiles, channels)
    tile_dbeta = te.placeholder(shape, dtype, "tile_dbeta")
    tile_dgamma = te.placeholder(shape, dtype, "tile_dgamma")
    scale, mean, invstd = (te.placeholder((channels,), dtype, name) for name in ("scale", "mean", "invstd"))
    inv_m = tirx.const(1.0 / m, dtype)

    t = te.reduce_axis((0, num_tiles), "t")
    dbeta = te.compute((channels,), lambda c: te.sum(tile_dbeta[t, c], axis=t), name="dbeta")
    t2 = te.reduce_axis((0, num_tiles), "t2")
    dgamma = te.compute((channels,), lambda c: te.sum(tile_dgamma[t2, c], axis=t2), name="dgamma")
    c1 = te.compute((channels,), lambda c: scale[c], name="c1")
    c2 = te.compute((channels,), lambda c: -scale[c] * invstd[c] * dgamma[c] * inv_m, name="c2")
    c3 = te.compute((channels,), lambda c: -scale[c] * dbeta[c] * inv_m - c2[c] * mean[c], name="c3")
    return [tile_dbeta, tile_dgamma, scale, mean, invstd, dgamma, dbeta, c1, c2, c3]


def stats(shape: tuple[int, int, int, int], dtype: str, relu: bool):
    """Stages ``dz``, ``tile_dbeta``, ``tile_dgamma``.

    Arguments: da, x_raw, [scale, shift], mean, invstd, outputs dz, tile_dbeta, tile_dgamma.
    """
    da = te.placeholder(shape, dtype, "da")
    ep = epilogue_inputs(shape, dtype, relu)
    return [da, *ep.values(), *bn_relu_backward(da, ep)]


def dx(shape: tuple[int, int, int, int], dtype: str):
    """Stage ``grad`` alone. Arguments: dz, x, c1, c2, c3, output dx."""
    dz = te.placeholder(shape, dtype, "dz")
    x = te.placeholder(shape, dtype, "x")
    c1, c2, c3 = (te.placeholder((shape[1],), dtype, name) for name in ("c1", "c2", "c3"))
    return [dz, x, c1, c2, c3, grad_prologue(dz, x, c1, c2, c3)]
