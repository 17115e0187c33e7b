"""The main job (for now): a conv-BN-ReLU-conv chain's forward pass, restructured.

Builds the fused forward kernels for the host CPU, runs a few training-mode steps and one
eval step, checks every output and the running statistics against PyTorch's modules, and
prints what it did and how long each part took.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import functional as rbn
from .benchmarks.timing import machine, time_alternating
from .build.target import host_family


def chain_modules(c_in=32, c_mid=64, c_out=64):
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(c_mid)
    conv2 = torch.nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False)
    return conv1, bn, conv2


def restructured_forward(x, conv1, bn, conv2):
    """conv1 + stats epilogue -> finalize -> apply+ReLU prologue + conv2 + stats epilogue."""
    y1, tile_sum, tile_m2 = rbn.conv2d_stats(x, conv1.weight, conv1.stride, conv1.padding)
    if bn.training:
        coeffs = rbn.bn_finalize(tile_sum, tile_m2, rbn.tile_count(y1), bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, bn.num_batches_tracked, momentum=bn.momentum, eps=bn.eps)
        scale, shift = coeffs.scale, coeffs.shift
    else:
        scale, shift = rbn.bn_eval_coefficients(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    return rbn.bn_relu_conv2d_stats(y1, scale, shift, conv2.weight, conv2.stride, conv2.padding)


@torch.no_grad()
def main(batch=8, size=32, steps=3) -> int:
    m = machine()
    print(f"tvm_rbn demo on {m['cpu']} ({host_family()}), threads: torch {m['torch_threads']}, tvm {m['tvm_threads']}")
    conv1, bn_ref, conv2 = chain_modules()
    bn_ours = torch.nn.BatchNorm2d(bn_ref.num_features)
    bn_ours.load_state_dict(bn_ref.state_dict())
    print(f"chain: conv3x3 {conv1.in_channels}->{conv1.out_channels} -> BN -> ReLU -> "
          f"conv3x3 {conv2.in_channels}->{conv2.out_channels}, input {batch}x{conv1.in_channels}x{size}x{size}, fp32")

    start = time.perf_counter()
    restructured_forward(torch.randn(batch, conv1.in_channels, size, size), conv1, bn_ours, conv2)
    print(f"built (or loaded from cache) and ran the fused kernels in {time.perf_counter() - start:.2f} s")
    bn_ours.load_state_dict(bn_ref.state_dict())

    worst = 0.0
    for step in range(steps):
        x = torch.randn(batch, conv1.in_channels, size, size) * (1 + step) + step
        ours = restructured_forward(x, conv1, bn_ours, conv2)[0]
        ref = conv2(F.relu(bn_ref(conv1(x))))
        worst = max(worst, (ours - ref).abs().max().item() / ref.abs().max().item())
    stats_diff = max((bn_ours.running_mean - bn_ref.running_mean).abs().max().item(),
                     (bn_ours.running_var - bn_ref.running_var).abs().max().item())
    bn_ours.eval(), bn_ref.eval()
    x = torch.randn(batch, conv1.in_channels, size, size)
    eval_diff = (restructured_forward(x, conv1, bn_ours, conv2)[0] - conv2(F.relu(bn_ref(conv1(x))))).abs().max().item()
    ok = worst < 1e-4 and stats_diff < 1e-5 and eval_diff < 1e-3
    print(f"training steps: {steps}, max relative output diff vs PyTorch {worst:.1e}; "
          f"running stats max diff {stats_diff:.1e}; eval output max diff {eval_diff:.1e} -> {'OK' if ok else 'MISMATCH'}")

    bn_ours.train(), bn_ref.train()
    x = torch.randn(batch, conv1.in_channels, size, size)
    t = time_alternating({
        "tvm_rbn": lambda: restructured_forward(x, conv1, bn_ours, conv2),
        "pytorch": lambda: conv2(F.relu(bn_ref(conv1(x)))),
    }, reps=15)
    ours_ms, torch_ms = t["tvm_rbn"]["median_s"] * 1e3, t["pytorch"]["median_s"] * 1e3
    print(f"forward of the chain, median of 15 (alternating): tvm_rbn {ours_ms:.2f} ms, PyTorch {torch_ms:.2f} ms "
          f"({torch_ms / ours_ms:.2f}x); kernels use the untuned default schedules")
    return 0 if ok else 1
