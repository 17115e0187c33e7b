"""One BatchNorm layer between two convolutions, restructured vs PyTorch, in one process.

Ours (per step of the layer): bn_finalize (per channel, from the previous conv's statistics
epilogue) + the fused apply+ReLU prologue / conv / statistics epilogue kernel.
PyTorch's unfused sequence for the same layer: batch_norm (training: statistics + normalize),
relu, conv2d (oneDNN). Also reported: the conv2d alone.

    python -m tvm_rbn.benchmarks.layer [--n 8 --c 64 --k 64 --hw 56 --kernel 3] [--out out/layer.json]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .. import functional as rbn
from ..ops.conv2d_bn import Conv2dGeometry
from .timing import machine, save_json, time_alternating


def run(n=8, c=64, k=64, hw=56, kernel=3, stride=1, reps=15) -> dict:
    padding = kernel // 2
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw)
    w = torch.randn(k, c, kernel, kernel) / (c * kernel * kernel) ** 0.5
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    # statistics of x, as the previous conv's epilogue would have produced them
    tile_sum, tile_m2 = rbn.batch_stats(x)
    count = rbn.tile_count(x)

    def ours():
        coeffs = rbn.bn_finalize(tile_sum, tile_m2, count, gamma, beta, rm, rv, momentum=0.1)
        return rbn.bn_relu_conv2d_stats(x, coeffs.scale, coeffs.shift, w, stride, padding)

    def torch_unfused():
        a = F.relu(F.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5))
        return F.conv2d(a, w, stride=stride, padding=padding)

    def torch_conv():
        return F.conv2d(x, w, stride=stride, padding=padding)

    with torch.no_grad():
        built = ours()  # builds the kernels before timing
        ref = torch_unfused()
        max_diff = (built[0] - ref).abs().max().item()
        result = time_alternating({"tvm_rbn": ours, "torch_unfused": torch_unfused, "torch_conv": torch_conv}, reps=reps)
    geo = Conv2dGeometry(n, c, hw, hw, k, kernel, kernel, (stride, stride), (padding, padding))
    med = {name: r["median_s"] for name, r in result.items()}
    return {
        "layer": dict(n=n, c=c, k=k, hw=hw, kernel=kernel, stride=stride, padding=padding, dtype="float32"),
        "schedule": "default (untuned)",
        "machine": machine(),
        "max_abs_diff_vs_torch": max_diff,
        "median_s": med,
        "gflops": {name: geo.flops / t / 1e9 for name, t in med.items()},
        "speedup_vs_torch_unfused": med["torch_unfused"] / med["tvm_rbn"],
        "speedup_vs_torch_conv": med["torch_conv"] / med["tvm_rbn"],
        "times_s": {name: r["times_s"] for name, r in result.items()},
    }


def format_table(r: dict) -> str:
    m, L = r["machine"], r["layer"]
    lines = [
        f"layer N{L['n']} C{L['c']} {L['hw']}x{L['hw']} K{L['k']} {L['kernel']}x{L['kernel']} "
        f"stride {L['stride']} pad {L['padding']}, fp32, {r['schedule']}",
        f"machine: {m['cpu']} ({m['family']}), threads: torch {m['torch_threads']}, tvm {m['tvm_threads']}",
        f"{'side':<16}{'median ms':>12}{'GFLOP/s':>10}",
    ]
    for name, t in r["median_s"].items():
        lines.append(f"{name:<16}{t * 1e3:>12.3f}{r['gflops'][name]:>10.1f}")
    lines.append(
        f"tvm_rbn vs torch unfused (bn+relu+conv): {r['speedup_vs_torch_unfused']:.2f}x; "
        f"vs torch conv alone: {r['speedup_vs_torch_conv']:.2f}x; max |diff| {r['max_abs_diff_vs_torch']:.2e}"
    )
    return "\n".join(lines)


def main(argv=None, prog=None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="out/layer.json")
    a = ap.parse_args(argv)
    r = run(a.n, a.c, a.k, a.hw, a.kernel, a.stride, a.reps)
    print(format_table(r))
    print(f"saved {save_json(a.out, r)}")


if __name__ == "__main__":
    main()
