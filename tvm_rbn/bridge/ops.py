"""The fused chain as PyTorch custom ops with autograd formulas and fake implementations.

Each op is one node of a restructured graph. A BatchNorm hands its consumers one opaque
per-channel tensor, ``coeffs`` of shape (4, C) = [scale; shift; mean; invstd]: consumers
compute relu(y*scale + shift), and reduce their BatchNorm gradient partials centred on mean.

    conv_bn_train   [apply(+ReLU) prologue of the previous BN] + conv + statistics epilogue +
                    finalize of the BN that follows -> (y raw, coeffs, new running mean/var)
    bn_train        statistics + finalize of a BN whose input is not one of our convs
    bn_eval         coeffs of an eval-mode BN, from its running statistics
    conv_prologue   [apply(+ReLU) prologue] + conv, no BN after it (without coeffs: a plain
                    conv, e.g. a DenseNet transition's, moved after its pool)
    bn_apply        the standalone apply(+ReLU), for consumers that are not our convs
    bn_add_relu     the end of a residual block, relu(bn(y) + identity) or relu(bn(y) + bn2(y2)),
                    one pass forward and one backward (masked gradient + both BNs' partials)
    bn_maxpool      max_pool2d(relu(bn(y))) (a stem), one pass forward (the pooled tensor and
                    each window's argmax tap) and one backward (scatter + ReLU mask + partials)
    bn_avgpool      avg_pool2d(relu(bn(y))) over non-overlapping windows (a DenseNet
                    transition, its 1x1 conv moved after the pool), one pass each way

Gradient convention for ``coeffs`` (private to these ops, which are its only producers and
consumers): the gradient a consumer returns for coeffs holds, in row 0, its part of
dgamma = sum dz*xhat (xhat = (y - mean)*invstd) and, in row 1, its part of dbeta = sum dz;
rows 2-3 are zero. Centred sums keep the BatchNorm gradients accurate when |mean| >> std,
where sum(dz*y) - mean*sum(dz) would cancel. The producer turns dgamma/dbeta into the
parameter gradients and into c2 = -scale*invstd*dgamma/m, c3 = -scale*dbeta/m - c2*mean
(DESIGN.md section 3); the raw output's gradient dy + c2*y + c3 is never materialized: the
dgrad and wgrad kernels form it in their prologue. For y, a consumer returns scale*dz (the
gradient of relu(y*scale + shift) with the coefficients held fixed), so the sum over (n, p, q)
of what the producer receives for y is scale*dbeta.

Conv bias: a BatchNorm cancels a per-channel shift of its input, so the bias of a conv that
feeds a BatchNorm is folded into that BatchNorm instead of being added to the conv output:
``conv_bn_train`` returns y = conv(x) without the bias, and coeffs relative to that y (the
statistics of y + b are those of y with the mean moved by b, which leaves scale and shift
unchanged); only the running mean sees the bias (+ factor*b). In eval mode ``bn_eval`` folds
it into shift and mean (shift + b*scale, running_mean - b). The bias gradient, the sum of the
conv output's gradient over (n, p, q), is scale*dbeta + m*(c2*mean + c3): formed from the
dbeta reduction the backward already does (``_bias_grad``), no pass over a tensor. A biased
conv not followed by a BatchNorm (``conv_prologue``) adds its bias after the kernel.

All ops are registered under ``torch.ops.tvm_rbn`` with fake implementations, so restructured
models run under torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import functional as rbn
from ..build import provider

_LIB = "tvm_rbn"


def _coeffs(c: Tensor) -> rbn.BNCoefficients:
    return rbn.BNCoefficients(*c.detach().unbind(0))


def _pack(c: rbn.BNCoefficients) -> Tensor:
    return torch.stack([c.scale, c.shift, c.mean, c.invstd])


def _grad_coeffs(dgamma: Tensor, dbeta: Tensor) -> Tensor:
    zeros = torch.zeros_like(dgamma)
    return torch.stack([dgamma, dbeta, zeros, zeros])


def _d(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _out_hw(x: Tensor, w: Tensor, stride, padding) -> tuple[int, int]:
    return (
        (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1,
        (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1,
    )


def _running_out(running: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if running is None else running


# --- forward ops -------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::conv_bn_train", mutates_args=())
def conv_bn_train(
    x: Tensor, coeffs_in: Optional[Tensor], relu_in: bool, weight: Tensor, conv_bias: Optional[Tensor],
    stride: list[int], padding: list[int], gamma: Optional[Tensor], beta: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float, factor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = conv(x) *without* the conv bias; coeffs relative to y (see "Conv bias" above)."""
    x, w = x.detach(), weight.detach()
    if coeffs_in is None:
        y, tile_sum, tile_m2 = rbn.conv2d_stats(x, w, stride, padding)
    else:
        c = _coeffs(coeffs_in)
        y, tile_sum, tile_m2 = rbn.bn_relu_conv2d_stats(x, c.scale, c.shift, w, stride, padding, relu_in)
    coeffs, rm, rv = _finalize(tile_sum, tile_m2, rbn.tile_count(y), gamma, beta, running_mean, running_var, eps,
                               factor)
    if conv_bias is not None and running_mean is not None:
        rm.add_(conv_bias.detach(), alpha=factor)  # the BN input's mean is mean(y) + bias
    return y, coeffs, rm, rv


def _finalize(tile_sum, tile_m2, count, gamma, beta, running_mean, running_var, eps, factor):
    rm = None if running_mean is None else running_mean.detach().clone()
    rv = None if running_var is None else running_var.detach().clone()
    c = rbn.bn_finalize(tile_sum, tile_m2, count, _d(gamma), _d(beta), rm, rv, None, momentum=factor, eps=eps)
    return _pack(c), _running_out(rm, tile_sum), _running_out(rv, tile_sum)


def _fake_running(running: Optional[Tensor], x: Tensor, channels: int) -> Tensor:
    return x.new_empty(channels if running is not None else 0)


@conv_bn_train.register_fake
def _(x, coeffs_in, relu_in, weight, conv_bias, stride, padding, gamma, beta, running_mean, running_var, eps,
      factor):
    p, q = _out_hw(x, weight, stride, padding)
    k = weight.shape[0]
    return (x.new_empty((x.shape[0], k, p, q)), x.new_empty((4, k)),
            _fake_running(running_mean, x, k), _fake_running(running_var, x, k))


@torch.library.custom_op(f"{_LIB}::bn_train", mutates_args=())
def bn_train(
    x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], eps: float, factor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    tile_sum, tile_m2 = rbn.batch_stats(x.detach())
    return _finalize(tile_sum, tile_m2, rbn.tile_count(x), gamma, beta, running_mean, running_var, eps, factor)


@bn_train.register_fake
def _(x, gamma, beta, running_mean, running_var, eps, factor):
    c = x.shape[1]
    return x.new_empty((4, c)), _fake_running(running_mean, x, c), _fake_running(running_var, x, c)


@torch.library.custom_op(f"{_LIB}::bn_eval", mutates_args=())
def bn_eval(gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
            eps: float, conv_bias: Optional[Tensor] = None) -> Tensor:
    """Eval-mode coeffs; with conv_bias, relative to the conv output without its bias."""
    rm, rv = running_mean.detach(), running_var.detach()
    scale, shift = rbn.bn_eval_coefficients(_d(gamma), _d(beta), rm, rv, eps)
    if conv_bias is not None:  # BN(y + b) = (y - (rm - b))*scale + beta
        b = conv_bias.detach()
        return torch.stack([scale, shift + b * scale, rm - b, torch.rsqrt(rv + eps)])
    return torch.stack([scale, shift, rm, torch.rsqrt(rv + eps)])


@bn_eval.register_fake
def _(gamma, beta, running_mean, running_var, eps, conv_bias=None):
    return running_mean.new_empty((4, running_mean.shape[0]))


@torch.library.custom_op(f"{_LIB}::conv_prologue", mutates_args=())
def conv_prologue(x: Tensor, coeffs_in: Optional[Tensor], relu_in: bool, weight: Tensor, stride: list[int],
                  padding: list[int], conv_bias: Optional[Tensor] = None) -> Tensor:
    if coeffs_in is None:
        y = rbn.conv2d(x.detach(), weight.detach(), stride, padding)
    else:
        c = _coeffs(coeffs_in)
        y = rbn.bn_relu_conv2d(x.detach(), c.scale, c.shift, weight.detach(), stride, padding, relu_in)
    if conv_bias is not None:  # no BatchNorm follows to fold it into: added here
        y.add_(conv_bias.detach().view(1, -1, 1, 1))
    return y


@conv_prologue.register_fake
def _(x, coeffs_in, relu_in, weight, stride, padding, conv_bias=None):
    p, q = _out_hw(x, weight, stride, padding)
    return x.new_empty((x.shape[0], weight.shape[0], p, q))


@torch.library.custom_op(f"{_LIB}::bn_apply", mutates_args=())
def bn_apply(x: Tensor, coeffs: Tensor, relu: bool) -> Tensor:
    c = _coeffs(coeffs)
    return rbn.bn_relu(x.detach(), c.scale, c.shift, relu)


@bn_apply.register_fake
def _(x, coeffs, relu):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::bn_add_relu", mutates_args=())
def bn_add_relu(y: Tensor, coeffs: Tensor, other: Tensor, coeffs_other: Optional[Tensor]) -> Tensor:
    """relu(y*scale + shift + other), or with coeffs_other relu(... + other*scale2 + shift2)."""
    c = _coeffs(coeffs)
    if coeffs_other is None:
        return rbn.bn_add_relu(y.detach(), c.scale, c.shift, other.detach())
    c2 = _coeffs(coeffs_other)
    return rbn.bn_add_relu(y.detach(), c.scale, c.shift, y2=other.detach(), scale2=c2.scale, shift2=c2.shift)


@bn_add_relu.register_fake
def _(y, coeffs, other, coeffs_other):
    return torch.empty_like(y)


@torch.library.custom_op(f"{_LIB}::bn_maxpool", mutates_args=())
def bn_maxpool(y: Tensor, coeffs: Tensor, relu: bool, kernel: list[int], stride: list[int],
               padding: list[int]) -> tuple[Tensor, Tensor]:
    """(max_pool2d(relu(y*scale + shift)), the int32 argmax tap of each window)."""
    c = _coeffs(coeffs)
    return rbn.bn_relu_maxpool(y.detach(), c.scale, c.shift, kernel, stride, padding, relu)


@bn_maxpool.register_fake
def _(y, coeffs, relu, kernel, stride, padding):
    shape = rbn.pool_output_shape(y.shape, rbn.pool_geometry(kernel, stride, padding))
    return y.new_empty(shape), y.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::bn_avgpool", mutates_args=())
def bn_avgpool(y: Tensor, coeffs: Tensor, relu: bool, kernel: list[int]) -> Tensor:
    """avg_pool2d(relu(y*scale + shift), kernel) (stride = kernel, no padding, floor mode)."""
    c = _coeffs(coeffs)
    return rbn.bn_relu_avgpool(y.detach(), c.scale, c.shift, kernel, relu)


@bn_avgpool.register_fake
def _(y, coeffs, relu, kernel):
    return y.new_empty(rbn.avgpool_output_shape(y.shape, kernel))


# --- backward ops ------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::conv_backward", mutates_args=())
def conv_backward(
    grad: Tensor, c2: Optional[Tensor], c3: Optional[Tensor], y: Optional[Tensor], x: Tensor,
    coeffs_in: Optional[Tensor], relu_in: bool, weight: Tensor, stride: list[int], padding: list[int],
    need_x: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, w and coeffs_in (empty where not needed).

    The conv output's gradient is `grad`, or grad + c2*y + c3 formed in the kernels' prologue.
    """
    g = rbn.DeferredGrad(grad, y, torch.ones_like(c2), c2, c3) if c2 is not None else grad
    gx, gw, gcoeffs = (grad.new_empty(0) for _ in range(3))
    c = None if coeffs_in is None else _coeffs(coeffs_in)
    if need_x:
        if c is None:
            gx = rbn.conv2d_dgrad(g, weight, x.shape, stride, padding)
        else:
            dz, tile_dbeta, tile_dgamma = rbn.conv2d_dgrad_bn_relu(g, weight, x, c, stride, padding, relu_in)
            gcoeffs = _grad_coeffs(tile_dgamma.sum(0), tile_dbeta.sum(0))
            gx = dz.mul_(c.scale.view(1, -1, 1, 1))
    if need_w:
        kernel_size = tuple(weight.shape[2:])
        if c is None:
            gw = rbn.conv2d_wgrad(g, x, kernel_size, stride, padding)
        else:
            gw = rbn.bn_relu_conv2d_wgrad(g, x, c.scale, c.shift, kernel_size, stride, padding, relu_in)
    return gx, gw, gcoeffs


@conv_backward.register_fake
def _(grad, c2, c3, y, x, coeffs_in, relu_in, weight, stride, padding, need_x, need_w):
    has_prologue = need_x and coeffs_in is not None
    return (
        torch.empty_like(x) if need_x else grad.new_empty(0),
        torch.empty_like(weight) if need_w else grad.new_empty(0),
        x.new_empty((4, x.shape[1]) if has_prologue else (0,)),
    )


@torch.library.custom_op(f"{_LIB}::bn_apply_backward", mutates_args=())
def bn_apply_backward(grad: Tensor, x: Tensor, coeffs: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    c = _coeffs(coeffs)
    dz, tile_dbeta, tile_dgamma = rbn.bn_relu_backward_stats(grad, x, c, relu)
    return dz.mul_(c.scale.view(1, -1, 1, 1)), _grad_coeffs(tile_dgamma.sum(0), tile_dbeta.sum(0))


@bn_apply_backward.register_fake
def _(grad, x, coeffs, relu):
    return torch.empty_like(x), coeffs.new_empty(coeffs.shape)


@torch.library.custom_op(f"{_LIB}::bn_add_relu_backward", mutates_args=())
def bn_add_relu_backward(grad: Tensor, a: Tensor, y: Tensor, coeffs: Tensor, y2: Optional[Tensor],
                         coeffs2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of y, of the other operand (identity, or y2), of coeffs and of coeffs2
    (empty without a second BatchNorm), from one pass over grad, a, y[, y2]."""
    c = _coeffs(coeffs)
    if y2 is None:
        g_y, g_other, tile_dbeta, tile_dgamma = rbn.bn_add_relu_backward(grad, a, y, c)
        return g_y, g_other, _grad_coeffs(tile_dgamma.sum(0), tile_dbeta.sum(0)), grad.new_empty(0)
    g_y, g_other, tile_dbeta, tile_dgamma, tile_dgamma2 = rbn.bn_add_relu_backward(grad, a, y, c, y2,
                                                                                  _coeffs(coeffs2))
    dbeta = tile_dbeta.sum(0)
    return g_y, g_other, _grad_coeffs(tile_dgamma.sum(0), dbeta), _grad_coeffs(tile_dgamma2.sum(0), dbeta)


@bn_add_relu_backward.register_fake
def _(grad, a, y, coeffs, y2, coeffs2):
    return (torch.empty_like(y), torch.empty_like(y), coeffs.new_empty(coeffs.shape),
            coeffs.new_empty(coeffs.shape if coeffs2 is not None else (0,)))


@torch.library.custom_op(f"{_LIB}::bn_maxpool_backward", mutates_args=())
def bn_maxpool_backward(grad: Tensor, tap: Tensor, y: Tensor, coeffs: Tensor, relu: bool, kernel: list[int],
                        stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
    """Gradients of y (scale*dz) and of coeffs, from one pass over grad, tap and y."""
    g_y, tile_dbeta, tile_dgamma = rbn.bn_relu_maxpool_backward(grad, tap, y, _coeffs(coeffs), kernel, stride,
                                                                padding, relu)
    return g_y, _grad_coeffs(tile_dgamma.sum(0), tile_dbeta.sum(0))


@bn_maxpool_backward.register_fake
def _(grad, tap, y, coeffs, relu, kernel, stride, padding):
    return torch.empty_like(y), coeffs.new_empty(coeffs.shape)


@torch.library.custom_op(f"{_LIB}::bn_avgpool_backward", mutates_args=())
def bn_avgpool_backward(grad: Tensor, y: Tensor, coeffs: Tensor, relu: bool,
                        kernel: list[int]) -> tuple[Tensor, Tensor]:
    """Gradients of y (scale*dz) and of coeffs, from one pass over grad and y."""
    g_y, tile_dbeta, tile_dgamma = rbn.bn_relu_avgpool_backward(grad, y, _coeffs(coeffs), kernel, relu)
    return g_y, _grad_coeffs(tile_dgamma.sum(0), tile_dbeta.sum(0))


@bn_avgpool_backward.register_fake
def _(grad, y, coeffs, relu, kernel):
    return torch.empty_like(y), coeffs.new_empty(coeffs.shape)


# --- autograd formulas -------------------------------------------------------------------------


def _bn_backward(g_coeffs: Optional[Tensor], coeffs: Tensor, m: int):
    """dgamma, dbeta and the c2, c3 of the raw input's extra gradient c2*y + c3."""
    if g_coeffs is None:
        g_coeffs = torch.zeros_like(coeffs)
    dgamma, dbeta = g_coeffs[0], g_coeffs[1]
    scale, _, mean, invstd = coeffs.unbind(0)
    c2 = -scale * invstd * dgamma / m
    c3 = -scale * dbeta / m - c2 * mean
    return dgamma, dbeta, c2, c3


def _bias_grad(dbeta: Tensor, coeffs: Tensor, c2: Tensor, c3: Tensor, m: int) -> Tensor:
    """d loss / d conv bias = sum over (n, p, q) of the conv output's gradient g_y + c2*y + c3.

    The consumers' part of g_y is scale*dz (the private convention), and dbeta = sum dz; sum y
    = m*mean: the bias gradient is scale*dbeta + m*(c2*mean + c3), from the reductions the
    backward already did. (In training mode it is 0 up to rounding: the BatchNorm cancels a
    per-channel shift of its input.)
    """
    scale, _, mean, _ = coeffs.unbind(0)
    return scale * dbeta + m * (c2 * mean + c3)


def _setup_conv_bn(ctx, inputs, output):
    ctx.owner = provider.current_owner()  # backward kernels count for the same BN
    x, coeffs_in, relu_in, weight, conv_bias, stride, padding, gamma = inputs[:8]
    y, coeffs = output[:2]
    ctx.save_for_backward(x, coeffs_in, weight, y, coeffs)
    ctx.conf = (relu_in, list(stride), list(padding), gamma is not None)


def _backward_conv_bn(ctx, g_y, g_coeffs, *_unused):
    x, coeffs_in, weight, y, coeffs = ctx.saved_tensors
    relu_in, stride, padding, affine = ctx.conf
    m = y.shape[0] * y.shape[2] * y.shape[3]
    dgamma, dbeta, c2, c3 = _bn_backward(g_coeffs, coeffs, m)
    g_y = torch.zeros_like(y) if g_y is None else g_y.contiguous()
    need = ctx.needs_input_grad
    with provider.owner(ctx.owner):
        gx, gw, gcoeffs_in = torch.ops.tvm_rbn.conv_backward(
            g_y, c2, c3, y, x, coeffs_in, relu_in, weight, stride, padding, need[0] or need[1], need[3])
    gb = _bias_grad(dbeta, coeffs, c2, c3, m) if need[4] else None
    return (gx if need[0] else None, gcoeffs_in if need[1] else None, None, gw if need[3] else None, gb, None, None,
            dgamma if affine and need[7] else None, dbeta if affine and need[8] else None, None, None, None, None)


torch.library.register_autograd(f"{_LIB}::conv_bn_train", _backward_conv_bn, setup_context=_setup_conv_bn)


def _setup_bn(ctx, inputs, output):
    ctx.owner = provider.current_owner()  # backward kernels count for the same BN
    ctx.save_for_backward(inputs[0], output[0])
    ctx.affine = inputs[1] is not None


def _backward_bn(ctx, g_coeffs, *_unused):
    x, coeffs = ctx.saved_tensors
    dgamma, dbeta, c2, c3 = _bn_backward(g_coeffs, coeffs, x.shape[0] * x.shape[2] * x.shape[3])
    need = ctx.needs_input_grad
    gx = x * c2.view(1, -1, 1, 1) + c3.view(1, -1, 1, 1) if need[0] else None
    return (gx, dgamma if ctx.affine and need[1] else None, dbeta if ctx.affine and need[2] else None,
            None, None, None, None)


torch.library.register_autograd(f"{_LIB}::bn_train", _backward_bn, setup_context=_setup_bn)


def _setup_bn_eval(ctx, inputs, output):
    ctx.owner = provider.current_owner()  # backward kernels count for the same BN
    ctx.affine = inputs[0] is not None
    ctx.save_for_backward(output)


def _backward_bn_eval(ctx, g_coeffs):
    need = ctx.needs_input_grad
    (coeffs,) = ctx.saved_tensors
    grads = (g_coeffs[0] if ctx.affine and need[0] else None, g_coeffs[1] if ctx.affine and need[1] else None,
             None, None, None)
    if len(need) > 5:  # called with a conv bias: its gradient is sum over (n, p, q) of scale*dz
        grads += (coeffs[0] * g_coeffs[1] if need[5] else None,)
    return grads


torch.library.register_autograd(f"{_LIB}::bn_eval", _backward_bn_eval, setup_context=_setup_bn_eval)


def _setup_conv(ctx, inputs, output):
    ctx.owner = provider.current_owner()  # backward kernels count for the same BN
    x, coeffs_in, relu_in, weight, stride, padding = inputs[:6]
    ctx.save_for_backward(x, coeffs_in, weight)
    ctx.conf = (relu_in, list(stride), list(padding))


def _backward_conv(ctx, g_y):
    x, coeffs_in, weight = ctx.saved_tensors
    relu_in, stride, padding = ctx.conf
    need = ctx.needs_input_grad
    with provider.owner(ctx.owner):
        gx, gw, gcoeffs_in = torch.ops.tvm_rbn.conv_backward(
            g_y.contiguous(), None, None, None, x, coeffs_in, relu_in, weight, stride, padding,
            need[0] or need[1], need[3])
    grads = (gx if need[0] else None, gcoeffs_in if need[1] else None, None, gw if need[3] else None, None, None)
    if len(need) > 6:  # called with a conv bias
        grads += (g_y.sum((0, 2, 3)) if need[6] else None,)
    return grads


torch.library.register_autograd(f"{_LIB}::conv_prologue", _backward_conv, setup_context=_setup_conv)


def _setup_apply(ctx, inputs, output):
    ctx.owner = provider.current_owner()  # backward kernels count for the same BN
    x, coeffs, relu = inputs
    ctx.save_for_backward(x, coeffs)
    ctx.relu = relu


def _backward_apply(ctx, g):
    x, coeffs = ctx.saved_tensors
    gx, gcoeffs = torch.ops.tvm_rbn.bn_apply_backward(g.contiguous(), x, coeffs, ctx.relu)
    return gx, gcoeffs, None


torch.library.register_autograd(f"{_LIB}::bn_apply", _backward_apply, setup_context=_setup_apply)


def _setup_add_relu(ctx, inputs, output):
    y, coeffs, other, coeffs_other = inputs
    ctx.save_for_backward(y, coeffs, other if coeffs_other is not None else None, coeffs_other, output)


def _backward_add_relu(ctx, g):
    y, coeffs, y2, coeffs2, a = ctx.saved_tensors
    g_y, g_other, g_coeffs, g_coeffs2 = torch.ops.tvm_rbn.bn_add_relu_backward(g.contiguous(), a, y, coeffs, y2,
                                                                               coeffs2)
    need = ctx.needs_input_grad
    return (g_y if need[0] else None, g_coeffs if need[1] else None, g_other if need[2] else None,
            g_coeffs2 if coeffs2 is not None and need[3] else None)


torch.library.register_autograd(f"{_LIB}::bn_add_relu", _backward_add_relu, setup_context=_setup_add_relu)


def _setup_maxpool(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the tap output gets no gradient: no zeros of its size
    y, coeffs, relu, kernel, stride, padding = inputs
    ctx.save_for_backward(y, coeffs, output[1])
    ctx.conf = (relu, list(kernel), list(stride), list(padding))


def _backward_maxpool(ctx, g, _g_tap):
    if g is None:  # the pooled output reached no loss
        return None, None, None, None, None, None
    y, coeffs, tap = ctx.saved_tensors
    relu, kernel, stride, padding = ctx.conf
    g_y, g_coeffs = torch.ops.tvm_rbn.bn_maxpool_backward(g.contiguous(), tap, y, coeffs, relu, kernel, stride,
                                                          padding)
    need = ctx.needs_input_grad
    return g_y if need[0] else None, g_coeffs if need[1] else None, None, None, None, None


torch.library.register_autograd(f"{_LIB}::bn_maxpool", _backward_maxpool, setup_context=_setup_maxpool)


def _setup_avgpool(ctx, inputs, output):
    y, coeffs, relu, kernel = inputs
    ctx.save_for_backward(y, coeffs)
    ctx.conf = (relu, list(kernel))


def _backward_avgpool(ctx, g):
    y, coeffs = ctx.saved_tensors
    relu, kernel = ctx.conf
    g_y, g_coeffs = torch.ops.tvm_rbn.bn_avgpool_backward(g.contiguous(), y, coeffs, relu, kernel)
    need = ctx.needs_input_grad
    return g_y if need[0] else None, g_coeffs if need[1] else None, None, None


torch.library.register_autograd(f"{_LIB}::bn_avgpool", _backward_avgpool, setup_context=_setup_avgpool)
