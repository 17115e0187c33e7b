"""Per-channel BatchNorm sub-layers that stand outside a convolution.

finalize      merges the per-tile statistics into mean / invstd, forms the apply
              coefficients scale = gamma*invstd, shift = beta - mean*scale, and the
              running-statistics update with PyTorch's semantics.
channel_stats the merged per-channel mean and biased variance alone (shared statistics).
eval_coeffs   the eval-mode form: scale/shift from the running statistics.
apply         y = relu(x*scale + shift): a standalone kernel for where a chain ends.
tile_stats    the statistics epilogue as a standalone kernel, for a BatchNorm whose input is
              not produced by one of our convolutions.
"""
from __future__ import annotations

from tvm import te, tirx

from .conv2d_bn import plane_stats, prologue


def _merge_tiles(tile_sum: te.Tensor, tile_m2: te.Tensor, tile_count: int):
    """Stages ``total``, ``mean`` and ``m2``: the Chan merge of per-tile sums and centred M2s
    of `tile_count` elements each (see ``finalize``)."""
    num_tiles, channels = (int(d) for d in tile_sum.shape)
    dtype = tile_sum.dtype
    m = num_tiles * tile_count
    t = te.reduce_axis((0, num_tiles), "t")
    total = te.compute((channels,), lambda c: te.sum(tile_sum[t, c], axis=t), name="total")
    mean = te.compute((channels,), lambda c: total[c] * tirx.const(1.0 / m, dtype), name="mean")
    t2 = te.reduce_axis((0, num_tiles), "t2")

    def merged_m2(c):
        d = tile_sum[t2, c] * tirx.const(1.0 / tile_count, dtype) - mean[c]
        return te.sum(tile_m2[t2, c] + tirx.const(tile_count, dtype) * d * d, axis=t2)

    return mean, te.compute((channels,), merged_m2, name="m2")


def finalize(num_tiles: int, channels: int, tile_count: int, dtype: str, update_running: bool):
    """Stages ``total``/``mean``, ``m2`` (Chan merge of tiles), then per-channel outputs.

    Merge of T tiles of `tile_count` elements each (m = T*tile_count):
        mean = sum_t S_t / m
        M2   = sum_t [M2_t + tile_count * (S_t/tile_count - mean)^2]
        var  = M2 / m  (biased; used to normalize)
    Running statistics (only with update_running), with factor = momentum, or
    1/num_batches_tracked when momentum is None (the caller passes the factor):
        running_mean' = (1-factor)*running_mean + factor*mean
        running_var'  = (1-factor)*running_var  + factor*var*m/(m-1)

    Arguments: tile_sum, tile_m2, gamma, beta, [running_mean, running_var], outputs
    scale, shift, mean, invstd, [running_mean', running_var'], then scalars eps, [factor].
    """
    m = num_tiles * tile_count
    shape = (num_tiles, channels)
    tile_sum = te.placeholder(shape, dtype, "tile_sum")
    tile_m2 = te.placeholder(shape, dtype, "tile_m2")
    gamma = te.placeholder((channels,), dtype, "gamma")
    beta = te.placeholder((channels,), dtype, "beta")
    eps = tirx.Var("eps", dtype)
    one = tirx.const(1, dtype)

    mean, m2 = _merge_tiles(tile_sum, tile_m2, tile_count)
    invstd = te.compute(
        (channels,), lambda c: one / te.sqrt(m2[c] * tirx.const(1.0 / m, dtype) + eps), name="invstd"
    )
    scale = te.compute((channels,), lambda c: gamma[c] * invstd[c], name="scale")
    shift = te.compute((channels,), lambda c: beta[c] - mean[c] * scale[c], name="shift")
    args = [tile_sum, tile_m2, gamma, beta]
    outs = [scale, shift, mean, invstd]
    scalars = [eps]
    if update_running:
        rmean = te.placeholder((channels,), dtype, "running_mean")
        rvar = te.placeholder((channels,), dtype, "running_var")
        factor = tirx.Var("factor", dtype)
        unbiased = tirx.const(1.0 / (m - 1), dtype)
        new_rmean = te.compute(
            (channels,), lambda c: (one - factor) * rmean[c] + factor * mean[c], name="new_running_mean"
        )
        new_rvar = te.compute(
            (channels,), lambda c: (one - factor) * rvar[c] + factor * m2[c] * unbiased, name="new_running_var"
        )
        args += [rmean, rvar]
        outs += [new_rmean, new_rvar]
        scalars.append(factor)
    return args + outs + scalars


def channel_stats(num_tiles: int, channels: int, tile_count: int, dtype: str):
    """Stages ``total``, ``mean``, ``m2`` (as in ``finalize``), ``var``: the per-channel batch
    mean and biased variance alone, for channels whose statistics several BatchNorms share
    (each forms its own coefficients from them).

    Arguments: tile_sum, tile_m2, outputs mean, var.
    """
    m = num_tiles * tile_count
    shape = (num_tiles, channels)
    tile_sum = te.placeholder(shape, dtype, "tile_sum")
    tile_m2 = te.placeholder(shape, dtype, "tile_m2")
    mean, m2 = _merge_tiles(tile_sum, tile_m2, tile_count)
    var = te.compute((channels,), lambda c: m2[c] * tirx.const(1.0 / m, dtype), name="var")
    return [tile_sum, tile_m2, mean, var]


def eval_coeffs(channels: int, dtype: str):
    """scale = gamma / sqrt(running_var + eps), shift = beta - running_mean*scale.

    Arguments: gamma, beta, running_mean, running_var, outputs scale, shift, scalar eps.
    """
    gamma, beta, rmean, rvar = (
        te.placeholder((channels,), dtype, name) for name in ("gamma", "beta", "running_mean", "running_var")
    )
    eps = tirx.Var("eps", dtype)
    scale = te.compute((channels,), lambda c: gamma[c] / te.sqrt(rvar[c] + eps), name="scale")
    shift = te.compute((channels,), lambda c: beta[c] - rmean[c] * scale[c], name="shift")
    return [gamma, beta, rmean, rvar, scale, shift, eps]


def apply(shape: tuple[int, int, int, int], dtype: str, relu: bool):
    """Stage ``act`` alone. Arguments: x, scale, shift, output y."""
    x = te.placeholder(shape, dtype, "x")
    scale = te.placeholder((shape[1],), dtype, "scale")
    shift = te.placeholder((shape[1],), dtype, "shift")
    return [x, scale, shift, prologue(x, scale, shift, relu)]


def tile_stats(shape: tuple[int, int, int, int], dtype: str):
    """Stages ``tile_sum`` and ``tile_m2`` of a plain tensor. Arguments: x, outputs."""
    x = te.placeholder(shape, dtype, "x")
    return [x, *plane_stats(x)]
