"""Reference for ``tvm_rbn.ops.conv2d_bn_backward``."""
from __future__ import annotations

import torch

from .conv2d_bn import prologue


def grad_prologue(dz, x, c1, c2, c3):
    """The gradient c1*dz + c2*x + c3, per channel."""
    return c1[None, :, None, None] * dz + c2[None, :, None, None] * x + c3[None, :, None, None]


def gradient(grad):
    """A plain gradient tensor, or the grad prologue's operands (dz, x, c1, c2, c3)."""
    return grad if isinstance(grad, torch.Tensor) else grad_prologue(*grad)


def relu_backward(da, x_raw, scale, shift, relu: bool):
    if not relu:
        return da
    z = x_raw * scale[None, :, None, None] + shift[None, :, None, None]
    return torch.where(z > 0, da, torch.zeros_like(da))


def plane_grad_stats(dz, x_raw, mean, invstd):
    """Per (n, c) plane sums of dz and dz*xhat."""
    xhat = (x_raw - mean[None, :, None, None]) * invstd[None, :, None, None]
    return dz.sum(dim=(2, 3)), (dz * xhat).sum(dim=(2, 3))


def conv2d_dgrad(grad, w, x_raw, scale, shift, mean, invstd, input_hw, stride, padding, epilogue_relu: bool | None,
                 acc_in=None):
    """Returns da, or (dz, tile_dbeta, tile_dgamma) with the epilogue; with acc_in,
    (acc_in + scale*dz, tile_dbeta, tile_dgamma)."""
    g = gradient(grad)
    size = (g.shape[0], w.shape[1], *input_hw)
    da = torch.nn.grad.conv2d_input(size, w, g, stride=stride, padding=padding)
    if epilogue_relu is None:
        return da
    dz = relu_backward(da, x_raw, scale, shift, epilogue_relu)
    stats = plane_grad_stats(dz, x_raw, mean, invstd)
    if acc_in is not None:
        return (acc_in + scale[None, :, None, None] * dz, *stats)
    return (dz, *stats)


def conv2d_wgrad(grad, x_in, scale, shift, kernel_size, stride, padding, prologue_relu: bool | None):
    """Returns dw."""
    g = gradient(grad)
    a = x_in if prologue_relu is None else prologue(x_in, scale, shift, prologue_relu)
    size = (g.shape[1], a.shape[1], *kernel_size)
    return torch.nn.grad.conv2d_weight(a, size, g, stride=stride, padding=padding)

