"""Reference for ``tvm_rbn.ops.bn_backward``."""
from __future__ import annotations

from .conv2d_bn_backward import grad_prologue, plane_grad_stats, relu_backward


def finalize(tile_dbeta, tile_dgamma, tile_count: int, scale, mean, invstd):
    """Returns dgamma, dbeta, c1, c2, c3."""
    m = tile_dbeta.shape[0] * tile_count
    dbeta = tile_dbeta.sum(0)
    dgamma = tile_dgamma.sum(0)
    c2 = -scale * invstd * dgamma / m
    c3 = -scale * dbeta / m - c2 * mean
    return dgamma, dbeta, scale.clone(), c2, c3


def stats(da, x_raw, scale, shift, mean, invstd, relu: bool):
    """Returns dz, tile_dbeta, tile_dgamma."""
    dz = relu_backward(da, x_raw, scale, shift, relu)
    return (dz, *plane_grad_stats(dz, x_raw, mean, invstd))


def dx(dz, x, c1, c2, c3):
    return grad_prologue(dz, x, c1, c2, c3)
