"""The end of a residual branch: BatchNorm apply + add + ReLU in one pass, and its backward.

A ResNet block ends in ``relu(bn(y) + identity)``, where ``identity`` is the block input or,
with a projection shortcut, another BatchNorm's output. Restructured, with each BatchNorm as
per-channel (scale, shift) over its raw conv output::

    a = relu(y*scale + shift + identity)                       (second_bn=False)
    a = relu(y*scale + shift + y2*scale2 + shift2)             (second_bn=True)

Backward, given ``da`` (the gradient at ``a``) and ``a`` itself (the ReLU mask is a > 0, as in
PyTorch's threshold_backward on the ReLU output)::

    dz = da * [a > 0]                  the gradient at both BatchNorm outputs (and at identity)
    grad_y  = scale*dz                 the gradient at y with the coefficients held fixed
    grad_y2 = scale2*dz | grad_identity = dz
    tile_dbeta[n, c]   = sum_{h,w} dz             (the same for both BatchNorms)
    tile_dgamma[n, c]  = sum_{h,w} dz*(y - mean)*invstd
    tile_dgamma2[n, c] = sum_{h,w} dz*(y2 - mean2)*invstd2

so one pass over (da, a, y[, y2]) gives the masked gradient and both BatchNorms' centred
partials. Stage names: ``act`` (forward), ``dz``, ``grad_y``, ``grad_y2`` /
``grad_identity``, ``tile_dbeta``, ``tile_dgamma``, ``tile_dgamma2``.
"""
from __future__ import annotations

from tvm import te, tirx


def bn_add_relu(shape: tuple[int, int, int, int], dtype: str, second_bn: bool):
    """Arguments: y, scale, shift, then identity or (y2, scale2, shift2), output a."""
    c = shape[1]
    y = te.placeholder(shape, dtype, "y")
    scale, shift = te.placeholder((c,), dtype, "scale"), te.placeholder((c,), dtype, "shift")
    args = [y, scale, shift]
    if second_bn:
        y2 = te.placeholder(shape, dtype, "y2")
        scale2, shift2 = te.placeholder((c,), dtype, "scale2"), te.placeholder((c,), dtype, "shift2")
        args += [y2, scale2, shift2]

        def other(n, k, h, w):
            return y2[n, k, h, w] * scale2[k] + shift2[k]
    else:
        identity = te.placeholder(shape, dtype, "identity")
        args.append(identity)

        def other(n, k, h, w):
            return identity[n, k, h, w]

    zero = tirx.const(0, dtype)
    a = te.compute(
        shape, lambda n, k, h, w: te.max(y[n, k, h, w] * scale[k] + shift[k] + other(n, k, h, w), zero), name="act"
    )
    return args + [a]


def _plane_sum(shape, fn, name: str):
    n, c, h, w = shape
    rh = te.reduce_axis((0, h), f"rh_{name}")
    rw = te.reduce_axis((0, w), f"rw_{name}")
    return te.compute((n, c), lambda i, j: te.sum(fn(i, j, rh, rw), axis=[rh, rw]), name=name)


def bn_add_relu_backward(shape: tuple[int, int, int, int], dtype: str, second_bn: bool):
    """Arguments: da, a, y, mean, invstd, scale, [y2, mean2, invstd2, scale2], outputs grad_y,
    grad_y2 | grad_identity, tile_dbeta, tile_dgamma, [tile_dgamma2]."""
    c = shape[1]
    da, a, y = (te.placeholder(shape, dtype, name) for name in ("da", "a", "y"))
    mean, invstd, scale = (te.placeholder((c,), dtype, name) for name in ("mean", "invstd", "scale"))
    args = [da, a, y, mean, invstd, scale]
    if second_bn:
        y2 = te.placeholder(shape, dtype, "y2")
        mean2, invstd2, scale2 = (te.placeholder((c,), dtype, name) for name in ("mean2", "invstd2", "scale2"))
        args += [y2, mean2, invstd2, scale2]
    zero = tirx.const(0, dtype)
    dz = te.compute(shape, lambda n, k, h, w: tirx.Select(a[n, k, h, w] > zero, da[n, k, h, w], zero), name="dz")
    outs = [te.compute(shape, lambda n, k, h, w: scale[k] * dz[n, k, h, w], name="grad_y")]
    if second_bn:
        outs.append(te.compute(shape, lambda n, k, h, w: scale2[k] * dz[n, k, h, w], name="grad_y2"))
    else:
        outs.append(te.compute(shape, lambda n, k, h, w: dz[n, k, h, w], name="grad_identity"))
    outs.append(_plane_sum(shape, lambda i, j, h, w: dz[i, j, h, w], "tile_dbeta"))
    outs.append(_plane_sum(shape, lambda i, j, h, w: dz[i, j, h, w] * ((y[i, j, h, w] - mean[j]) * invstd[j]),
                           "tile_dgamma"))
    if second_bn:
        outs.append(_plane_sum(
            shape, lambda i, j, h, w: dz[i, j, h, w] * ((y2[i, j, h, w] - mean2[j]) * invstd2[j]), "tile_dgamma2"))
    return args + outs
