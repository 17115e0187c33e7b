"""Reference for ``tvm_rbn.ops.bn``."""
from __future__ import annotations

import torch

from .conv2d_bn import plane_stats as tile_stats  # noqa: F401  (same computation)
from .conv2d_bn import prologue


def finalize(tile_sum, tile_m2, tile_count: int, gamma, beta, running_mean, running_var, eps: float, factor: float):
    """Returns scale, shift, mean, invstd, and the updated running statistics (or None)."""
    m = tile_sum.shape[0] * tile_count
    mean = tile_sum.sum(0) / m
    d = tile_sum / tile_count - mean
    var = (tile_m2 + tile_count * d * d).sum(0) / m
    invstd = 1.0 / torch.sqrt(var + eps)
    scale = gamma * invstd
    shift = beta - mean * scale
    if running_mean is None:
        return scale, shift, mean, invstd, None, None
    new_rmean = (1 - factor) * running_mean + factor * mean
    new_rvar = (1 - factor) * running_var + factor * var * (m / (m - 1))
    return scale, shift, mean, invstd, new_rmean, new_rvar


def eval_coeffs(gamma, beta, running_mean, running_var, eps: float):
    scale = gamma / torch.sqrt(running_var + eps)
    return scale, beta - running_mean * scale


def apply(x, scale, shift, relu: bool):
    return prologue(x, scale, shift, relu)
