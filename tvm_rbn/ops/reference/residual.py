"""Reference for ``tvm_rbn.ops.residual``."""
from __future__ import annotations

import torch

from .conv2d_bn import prologue


def bn_add_relu(y, scale, shift, identity=None, y2=None, scale2=None, shift2=None):
    other = identity if y2 is None else prologue(y2, scale2, shift2, False)
    return torch.relu(prologue(y, scale, shift, False) + other)


def bn_add_relu_backward(da, a, y, mean, invstd, scale, y2=None, mean2=None, invstd2=None, scale2=None):
    """Returns grad_y, grad_y2 or grad_identity, tile_dbeta, tile_dgamma[, tile_dgamma2]."""
    c = lambda t: t[None, :, None, None]  # noqa: E731
    dz = torch.where(a > 0, da, torch.zeros_like(da))
    out = [c(scale) * dz, dz if y2 is None else c(scale2) * dz, dz.sum((2, 3)),
           (dz * (y - c(mean)) * c(invstd)).sum((2, 3))]
    if y2 is not None:
        out.append((dz * (y2 - c(mean2)) * c(invstd2)).sum((2, 3)))
    return tuple(out)
