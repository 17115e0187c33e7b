"""Reference for ``tvm_rbn.ops.conv2d_bn``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prologue(x, scale, shift, relu: bool):
    z = x * scale[None, :, None, None] + shift[None, :, None, None]
    return torch.relu(z) if relu else z


def plane_stats(y):
    """Per (n, k) plane sum and sum of squared deviations from the plane mean."""
    tile_sum = y.sum(dim=(2, 3))
    centred = y - (tile_sum / (y.shape[2] * y.shape[3]))[:, :, None, None]
    return tile_sum, (centred * centred).sum(dim=(2, 3))


def conv2d_fused(x, scale, shift, w, stride, padding, prologue_relu: bool | None, stats: bool):
    """Returns y, or (y, tile_sum, tile_m2) with stats."""
    a = x if prologue_relu is None else prologue(x, scale, shift, prologue_relu)
    y = F.conv2d(a, w, stride=stride, padding=padding)
    return (y, *plane_stats(y)) if stats else y
