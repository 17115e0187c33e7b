"""The fused chain as PyTorch custom ops with autograd formulas and fake implementations.

Each op is one node of a restructured graph; the tensors that flow between nodes are true
values and true gradients, so autograd composes them for any topology (a BatchNorm output
read by several convolutions, residual sums, ...):

    conv_bn_train   [apply(+ReLU) prologue of the previous BN] + conv + statistics epilogue +
                    finalize of the BN that follows: (x, [scale_in, shift_in], w, gamma, beta)
                    -> (y raw, scale, shift, mean, invstd, new running mean/var)
    bn_train        statistics + finalize of a BN whose input is not one of our convs
    conv_prologue   [apply(+ReLU) prologue] + conv: eval-mode BNs, convs after a BN with no
                    BN of their own
    bn_apply        the standalone apply(+ReLU), for consumers that are not our convs

Backward of conv_bn_train (DESIGN.md section 3): the BN's per-channel gradients (from its
scale/shift consumers) become c2 = 2*dvar/m and c3 = dmean/m - c2*mean, and the gradient of
the raw output, dy + c2*y + c3, is never materialized: the dgrad and wgrad kernels form it in
their prologue. The dgrad kernel's epilogue applies the previous BN's ReLU mask and reduces
that BN's scale/shift gradients.

All ops are registered under ``torch.ops.tvm_rbn`` with fake implementations, so restructured
models run under torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import functional as rbn

_LIB = "tvm_rbn"


def _d(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _out_hw(x: Tensor, w: Tensor, stride, padding) -> tuple[int, int]:
    return (
        (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1,
        (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1,
    )


def _ones_if_none(t: Optional[Tensor], like: Tensor, fill: float) -> Tensor:
    return torch.full((like.shape[0],), fill, dtype=like.dtype) if t is None else t


def _no_coeffs(scale: Tensor, shift: Tensor) -> rbn.BNCoefficients:
    """Coefficients that make the dgrad epilogue reduce sum(dz*x) (mean 0, invstd 1)."""
    return rbn.BNCoefficients(scale, shift, torch.zeros_like(scale), torch.ones_like(scale))


# --- forward ops -------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::conv_bn_train", mutates_args=())
def conv_bn_train(
    x: Tensor, scale_in: Optional[Tensor], shift_in: Optional[Tensor], relu_in: bool, weight: Tensor,
    stride: list[int], padding: list[int], gamma: Optional[Tensor], beta: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float, factor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, w = x.detach(), weight.detach()
    if scale_in is None:
        y, tile_sum, tile_m2 = rbn.conv2d_stats(x, w, stride, padding)
    else:
        y, tile_sum, tile_m2 = rbn.bn_relu_conv2d_stats(x, _d(scale_in), _d(shift_in), w, stride, padding, relu_in)
    return (y, *_finalize(tile_sum, tile_m2, rbn.tile_count(y), gamma, beta, running_mean, running_var, eps, factor))


def _finalize(tile_sum, tile_m2, count, gamma, beta, running_mean, running_var, eps, factor):
    rm = None if running_mean is None else running_mean.detach().clone()
    rv = None if running_var is None else running_var.detach().clone()
    c = rbn.bn_finalize(tile_sum, tile_m2, count, _d(gamma), _d(beta), rm, rv, None, momentum=factor, eps=eps)
    return (c.scale, c.shift, c.mean, c.invstd,
            tile_sum.new_empty(0) if rm is None else rm, tile_sum.new_empty(0) if rv is None else rv)


@conv_bn_train.register_fake
def _(x, scale_in, shift_in, relu_in, weight, stride, padding, gamma, beta, running_mean, running_var, eps, factor):
    p, q = _out_hw(x, weight, stride, padding)
    k = weight.shape[0]
    per_channel = [x.new_empty(k) for _ in range(4)]
    running = [x.new_empty(k if running_mean is not None else 0) for _ in range(2)]
    return (x.new_empty((x.shape[0], k, p, q)), *per_channel, *running)


@torch.library.custom_op(f"{_LIB}::bn_train", mutates_args=())
def bn_train(
    x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], eps: float, factor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    tile_sum, tile_m2 = rbn.batch_stats(x.detach())
    return _finalize(tile_sum, tile_m2, rbn.tile_count(x), gamma, beta, running_mean, running_var, eps, factor)


@bn_train.register_fake
def _(x, gamma, beta, running_mean, running_var, eps, factor):
    c = x.shape[1]
    return (*[x.new_empty(c) for _ in range(4)], *[x.new_empty(c if running_mean is not None else 0) for _ in range(2)])


@torch.library.custom_op(f"{_LIB}::conv_prologue", mutates_args=())
def conv_prologue(
    x: Tensor, scale_in: Optional[Tensor], shift_in: Optional[Tensor], relu_in: bool, weight: Tensor,
    stride: list[int], padding: list[int],
) -> Tensor:
    if scale_in is None:
        return torch.nn.functional.conv2d(x.detach(), weight.detach(), stride=stride, padding=padding)
    return rbn.bn_relu_conv2d(x.detach(), _d(scale_in), _d(shift_in), weight.detach(), stride, padding, relu_in)


@conv_prologue.register_fake
def _(x, scale_in, shift_in, relu_in, weight, stride, padding):
    p, q = _out_hw(x, weight, stride, padding)
    return x.new_empty((x.shape[0], weight.shape[0], p, q))


@torch.library.custom_op(f"{_LIB}::bn_apply", mutates_args=())
def bn_apply(x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    return rbn.bn_relu(x.detach(), scale.detach(), shift.detach(), relu)


@bn_apply.register_fake
def _(x, scale, shift, relu):
    return torch.empty_like(x)


# --- backward ops ------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::conv_backward", mutates_args=())
def conv_backward(
    grad: Tensor, c1: Optional[Tensor], c2: Optional[Tensor], c3: Optional[Tensor], y: Optional[Tensor],
    x: Tensor, scale_in: Optional[Tensor], shift_in: Optional[Tensor], relu_in: bool, weight: Tensor,
    stride: list[int], padding: list[int], need_x: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, w, scale_in, shift_in (empty where not needed).

    The output gradient is `grad`, or c1*grad + c2*y + c3 formed in the kernels' prologue.
    """
    g = rbn.DeferredGrad(grad, y, c1, c2, c3) if c2 is not None else grad
    gx, gw, gscale, gshift = (grad.new_empty(0) for _ in range(4))
    if need_x:
        if scale_in is None:
            gx = rbn.conv2d_dgrad(g, weight, x.shape, stride, padding)
        else:
            dz, tile_dbeta, tile_dsum = rbn.conv2d_dgrad_bn_relu(
                g, weight, x, _no_coeffs(scale_in, shift_in), stride, padding, relu_in
            )
            gscale, gshift = tile_dsum.sum(0), tile_dbeta.sum(0)
            gx = dz.mul_(scale_in.view(1, -1, 1, 1))
    if need_w:
        kernel_size = tuple(weight.shape[2:])
        if scale_in is None:
            gw = rbn.conv2d_wgrad(g, x, kernel_size, stride, padding)
        else:
            gw = rbn.bn_relu_conv2d_wgrad(g, x, scale_in, shift_in, kernel_size, stride, padding, relu_in)
    return gx, gw, gscale, gshift


@conv_backward.register_fake
def _(grad, c1, c2, c3, y, x, scale_in, shift_in, relu_in, weight, stride, padding, need_x, need_w):
    c = x.shape[1]
    has_prologue = need_x and scale_in is not None
    return (
        torch.empty_like(x) if need_x else grad.new_empty(0),
        torch.empty_like(weight) if need_w else grad.new_empty(0),
        x.new_empty(c if has_prologue else 0),
        x.new_empty(c if has_prologue else 0),
    )


@torch.library.custom_op(f"{_LIB}::bn_apply_backward", mutates_args=())
def bn_apply_backward(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    dz, tile_dbeta, tile_dsum = rbn.bn_relu_backward_stats(grad, x, _no_coeffs(scale, shift), relu)
    return dz.mul_(scale.view(1, -1, 1, 1)), tile_dsum.sum(0), tile_dbeta.sum(0)


@bn_apply_backward.register_fake
def _(grad, x, scale, shift, relu):
    return torch.empty_like(x), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


# --- autograd formulas -------------------------------------------------------------------------


def _bn_param_grads(g_scale, g_shift, gamma, mean, invstd, scale, m: int):
    """Per channel, from the gradients of scale = gamma*invstd and shift = beta - mean*scale:
    dgamma, dbeta, and c2, c3 of the raw input's gradient c2*y + c3 (through mean and var)."""
    zeros = torch.zeros_like(mean)
    g_scale = zeros if g_scale is None else g_scale
    g_shift = zeros if g_shift is None else g_shift
    g_gamma = (g_scale - g_shift * mean) * invstd
    g_mean = -g_shift * scale
    g_invstd = (g_scale - g_shift * mean) * gamma
    g_var = -0.5 * g_invstd * invstd * invstd * invstd
    c2 = 2.0 * g_var / m
    c3 = g_mean / m - c2 * mean
    return g_gamma, g_shift, c2, c3


def _setup_conv_bn(ctx, inputs, output):
    x, scale_in, shift_in, relu_in, weight, stride, padding, gamma, beta = inputs[:9]
    y, scale, shift, mean, invstd = output[:5]
    ctx.save_for_backward(x, scale_in, shift_in, weight, y, gamma, mean, invstd, scale)
    ctx.conf = (relu_in, list(stride), list(padding), gamma is not None)


def _backward_conv_bn(ctx, g_y, g_scale, g_shift, *_unused):
    x, scale_in, shift_in, weight, y, gamma, mean, invstd, scale = ctx.saved_tensors
    relu_in, stride, padding, affine = ctx.conf
    gamma_ = gamma if gamma is not None else torch.ones_like(mean)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    g_gamma, g_beta, c2, c3 = _bn_param_grads(g_scale, g_shift, gamma_, mean, invstd, scale, m)
    g_y = torch.zeros_like(y) if g_y is None else g_y
    need = ctx.needs_input_grad
    gx, gw, gscale_in, gshift_in = torch.ops.tvm_rbn.conv_backward(
        g_y.contiguous(), torch.ones_like(c2), c2, c3, y, x, scale_in, shift_in, relu_in, weight,
        stride, padding, need[0] or need[1] or need[2], need[4],
    )
    return (
        gx if need[0] else None, gscale_in if need[1] else None, gshift_in if need[2] else None, None,
        gw if need[4] else None, None, None,
        g_gamma if affine and need[7] else None, g_beta if affine and need[8] else None,
        None, None, None, None,
    )


torch.library.register_autograd(f"{_LIB}::conv_bn_train", _backward_conv_bn, setup_context=_setup_conv_bn)


def _setup_bn(ctx, inputs, output):
    x, gamma = inputs[0], inputs[1]
    scale, shift, mean, invstd = output[:4]
    ctx.save_for_backward(x, gamma, mean, invstd, scale)
    ctx.affine = gamma is not None


def _backward_bn(ctx, g_scale, g_shift, *_unused):
    x, gamma, mean, invstd, scale = ctx.saved_tensors
    gamma_ = gamma if gamma is not None else torch.ones_like(mean)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    g_gamma, g_beta, c2, c3 = _bn_param_grads(g_scale, g_shift, gamma_, mean, invstd, scale, m)
    gx = x * c2.view(1, -1, 1, 1) + c3.view(1, -1, 1, 1)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, g_gamma if ctx.affine and need[1] else None,
            g_beta if ctx.affine and need[2] else None, None, None, None, None)


torch.library.register_autograd(f"{_LIB}::bn_train", _backward_bn, setup_context=_setup_bn)


def _setup_conv(ctx, inputs, output):
    x, scale_in, shift_in, relu_in, weight, stride, padding = inputs
    ctx.save_for_backward(x, scale_in, shift_in, weight)
    ctx.conf = (relu_in, list(stride), list(padding))


def _backward_conv(ctx, g_y):
    x, scale_in, shift_in, weight = ctx.saved_tensors
    relu_in, stride, padding = ctx.conf
    need = ctx.needs_input_grad
    if scale_in is None:  # eval-mode BN with no prologue cannot happen; plain conv fallback
        gx = torch.nn.grad.conv2d_input(x.shape, weight, g_y, stride, padding) if need[0] else None
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, g_y, stride, padding) if need[4] else None
        return gx, None, None, None, gw, None, None
    gx, gw, gscale_in, gshift_in = torch.ops.tvm_rbn.conv_backward(
        g_y.contiguous(), None, None, None, None, x, scale_in, shift_in, relu_in, weight,
        stride, padding, need[0] or need[1] or need[2], need[4],
    )
    return (gx if need[0] else None, gscale_in if need[1] else None, gshift_in if need[2] else None, None,
            gw if need[4] else None, None, None)


torch.library.register_autograd(f"{_LIB}::conv_prologue", _backward_conv, setup_context=_setup_conv)


def _setup_apply(ctx, inputs, output):
    x, scale, shift, relu = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.relu = relu


def _backward_apply(ctx, g):
    x, scale, shift = ctx.saved_tensors
    gx, gscale, gshift = torch.ops.tvm_rbn.bn_apply_backward(g.contiguous(), x, scale, shift, ctx.relu)
    return gx, gscale, gshift, None


torch.library.register_autograd(f"{_LIB}::bn_apply", _backward_apply, setup_context=_setup_apply)
