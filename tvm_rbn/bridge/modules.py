"""Drop-in modules of a restructured graph. They subclass the modules they replace and share
their parameters and buffers (same tensors, same names), so state_dicts load both ways and an
optimizer built on the original model keeps working."""
from __future__ import annotations

import torch
from torch import nn

from ..build import provider
from . import ops  # noqa: F401  (registers torch.ops.tvm_rbn)


def bn_apply(y: torch.Tensor, coeffs: torch.Tensor, relu: bool) -> torch.Tensor:
    """Materialized relu(y*scale + shift), for consumers that are not fused convolutions."""
    return torch.ops.tvm_rbn.bn_apply(y, coeffs, relu)


def bn_maxpool(y: torch.Tensor, coeffs: torch.Tensor, relu: bool, kernel: list, stride: list,
               padding: list) -> torch.Tensor:
    """max_pool2d(relu(BN(y))) without the applied activation in memory."""
    return torch.ops.tvm_rbn.bn_maxpool(y, coeffs, relu, kernel, stride, padding)[0]


def bn_avgpool(y: torch.Tensor, coeffs: torch.Tensor, relu: bool, kernel: list) -> torch.Tensor:
    """avg_pool2d(relu(BN(y)), kernel) over non-overlapping windows, the activation never stored."""
    return torch.ops.tvm_rbn.bn_avgpool(y, coeffs, relu, kernel)


def bn_add_relu(y: torch.Tensor, coeffs: torch.Tensor, other: torch.Tensor, coeffs_other) -> torch.Tensor:
    """relu(BN(y) + other), other a tensor (coeffs_other None) or a second BN's raw output."""
    return torch.ops.tvm_rbn.bn_add_relu(y, coeffs, other, coeffs_other)


def _share(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make `new` hold exactly `old`'s parameters, buffers and flags."""
    # containers (parameters, buffers, hooks) are copied, their contents (the tensors) shared
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in old.__dict__.items()})
    return new


class RBNBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d restructured: returns (raw y, coeffs) instead of the normalized tensor
    (coeffs: see tvm_rbn.bridge.ops).

    With `conv_stride`/`conv_padding` set, the conv that produces its input is fused in: the
    node is called with the conv's input (raw, or as the previous BN's (y, coeffs)) and the
    conv weight, and the statistics come from the conv's epilogue.
    """

    conv_stride: tuple[int, int] | None = None
    conv_padding: tuple[int, int] | None = None
    relu_in: bool = False

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d | None, relu_in: bool) -> "RBNBatchNorm2d":
        new = _share(cls.__new__(cls), bn)
        if conv is not None:
            new.conv_stride, new.conv_padding = tuple(conv.stride), tuple(conv.padding)
        new.relu_in = relu_in
        new.kernels = set()  # symbols of the kernels run for this BN (see tvm_rbn.report)
        return new

    def forward(self, x, coeffs_in=None, conv_weight=None, conv_bias=None, stats=None):
        """conv_bias (with conv_weight): folded into this BatchNorm (see tvm_rbn.bridge.ops).
        stats: per-channel (mean, biased var) of x, computed elsewhere (a dense block's output,
        see tvm_rbn.bridge.dense): used instead of a statistics pass."""
        with provider.owner(self.kernels):
            return self._forward(x, coeffs_in, conv_weight, conv_bias, stats)

    def _forward(self, x, coeffs_in, conv_weight, conv_bias, stats):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        x = x.contiguous()
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        if not use_batch_stats:
            stride, padding = self.conv_stride, self.conv_padding
            if conv_weight is None:
                y = x
            elif coeffs_in is None:
                y = torch.nn.functional.conv2d(x, conv_weight, stride=stride, padding=padding)
            else:
                y = torch.ops.tvm_rbn.conv_prologue(x, coeffs_in, self.relu_in, conv_weight, list(stride), list(padding))
            return y, torch.ops.tvm_rbn.bn_eval(self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                                conv_bias)
        factor = 0.0
        if update:
            self.num_batches_tracked.add_(1)
            factor = float(self.momentum) if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        rm = self.running_mean if update else None
        rv = self.running_var if update else None
        if stats is not None:
            coeffs, new_rm, new_rv = torch.ops.tvm_rbn.bn_from_stats(
                stats, self.weight, self.bias, rm, rv, self.eps, factor, x.shape[0] * x.shape[2] * x.shape[3])
            y = x
        elif conv_weight is None:
            coeffs, new_rm, new_rv = torch.ops.tvm_rbn.bn_train(x, self.weight, self.bias, rm, rv, self.eps, factor)
            y = x
        else:
            y, coeffs, new_rm, new_rv = torch.ops.tvm_rbn.conv_bn_train(
                x, coeffs_in, self.relu_in, conv_weight, conv_bias, list(self.conv_stride), list(self.conv_padding),
                self.weight, self.bias, rm, rv, self.eps, factor)
        if update:
            with torch.no_grad():
                self.running_mean.copy_(new_rm)
                self.running_var.copy_(new_rv)
        return y, coeffs


class RBNConv2d(nn.Conv2d):
    """A Conv2d on our kernels whose input is a BatchNorm's (y, coeffs), apply(+ReLU) fused as
    prologue; or, called with a tensor alone, a plain conv (a DenseNet transition's, which the
    BatchNorm's apply reaches through the pool in front of it)."""

    relu_in: bool = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu_in: bool, kernels: set) -> "RBNConv2d":
        """kernels: the kernel-symbol set of the BatchNorm whose apply this conv carries."""
        new = _share(cls.__new__(cls), conv)
        new.relu_in = relu_in
        new.kernels = kernels
        return new

    def forward(self, y, coeffs=None):
        with provider.owner(self.kernels):
            return torch.ops.tvm_rbn.conv_prologue(
                y, coeffs, self.relu_in, self.weight, list(self.stride), list(self.padding), self.bias)
