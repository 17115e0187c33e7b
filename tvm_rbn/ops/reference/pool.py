"""Reference for ``tvm_rbn.ops.pool``: PyTorch's max and average pools on the applied BatchNorm output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv2d_bn import prologue


def _taps(indices, shape, kernel, stride, padding):
    """PyTorch's flat in-plane argmax -> the window tap i*kw + j."""
    w = shape[3]
    p, q = indices.shape[2:]
    rows, cols = indices // w, indices % w
    row0 = (torch.arange(p) * stride[0] - padding[0]).view(1, 1, -1, 1)
    col0 = (torch.arange(q) * stride[1] - padding[1]).view(1, 1, 1, -1)
    return ((rows - row0) * kernel[1] + (cols - col0)).to(torch.int32)


def bn_relu_maxpool(y, scale, shift, relu, kernel, stride, padding):
    """Returns pool, tap."""
    a = prologue(y, scale, shift, relu)
    pool, indices = F.max_pool2d(a, kernel, stride, padding, return_indices=True)
    return pool, _taps(indices, y.shape, kernel, stride, padding)


def _pool_backward(pool, dpool, y, scale, shift, mean, invstd, relu):
    """grad_y, tile_dbeta, tile_dgamma from PyTorch's backward of `pool` (and the ReLU)."""
    a = prologue(y, scale, shift, relu).detach().requires_grad_(True)
    pool(a).backward(dpool)
    dz = a.grad if not relu else torch.where(a > 0, a.grad, torch.zeros_like(a.grad))
    c = lambda t: t[None, :, None, None]  # noqa: E731
    return c(scale) * dz, dz.sum((2, 3)), (dz * (y - c(mean)) * c(invstd)).sum((2, 3))


def bn_relu_maxpool_backward(dpool, y, scale, shift, mean, invstd, relu, kernel, stride, padding):
    """Returns grad_y, tile_dbeta, tile_dgamma, from PyTorch's max-pool (and ReLU) backward."""
    return _pool_backward(lambda a: F.max_pool2d(a, kernel, stride, padding), dpool, y, scale, shift, mean, invstd,
                          relu)


def bn_relu_avgpool(y, scale, shift, relu, kernel):
    return F.avg_pool2d(prologue(y, scale, shift, relu), kernel, kernel)


def bn_relu_avgpool_backward(dpool, y, scale, shift, mean, invstd, relu, kernel):
    """Returns grad_y, tile_dbeta, tile_dgamma, from PyTorch's average-pool (and ReLU) backward."""
    return _pool_backward(lambda a: F.avg_pool2d(a, kernel, kernel), dpool, y, scale, shift, mean, invstd, relu)
