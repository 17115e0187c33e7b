"""One backward chain, restructured vs PyTorch autograd, in one process.

The chain: x0 -> conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> out (training-mode BatchNorm),
backward from a given d out to x0, both weights and both BatchNorms' gamma and beta.

Ours (untuned default schedules), seven kernels:
    bn_relu_backward_stats (bn2, standalone: its output feeds no conv of ours)
    bn_backward_finalize (bn2)
    bn_relu_conv2d_wgrad   (conv2: grad prologue from dz2, activation prologue from y1)
    conv2d_dgrad_bn_relu   (conv2: grad prologue, bn1+relu epilogue with partials)
    bn_backward_finalize (bn1)
    conv2d_wgrad           (conv1: grad prologue, plain input x0)
    conv2d_dgrad           (conv1: grad prologue, d x0)
PyTorch: ``out.backward(dout)`` through the graph of F.conv2d, F.batch_norm(training=True) and
relu (oneDNN convolutions), graph built once and retained.

The sides alternate, each rep timing one full backward per side, median of --reps after
--warmup. Both runtimes keep their worker threads spinning for a while after a parallel
region (PyTorch's OpenMP pool for milliseconds); on a machine with few cores the side timed
right after the other pays for those spinning threads, up to several times its own run time
for small layers. So each timed call is preceded by --lead-in untimed calls of the same side
(default 1), which absorb that, as in a training loop where each runtime runs back to back.
--settle-ms adds idle time before each call instead or as well (on small VMs idle vCPUs wake
up slowly, so this is not the default). The JSON records the settings.

Also reported: the bytes each side keeps from forward for this backward (PyTorch's autograd
saved tensors, counted by storage through saved_tensors_hooks; ours: x0, y1, y2, the weights
and the per-channel coefficients).

    python -m tvm_rbn.benchmarks.backward_chain [--n 8 --c 64 --hw 56 --kernel 3] [--out out/backward_chain.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from .. import functional as rbn
from ..ops.conv2d_bn import Conv2dGeometry
from .timing import machine, save_json, time_sides


class _Chain:
    def __init__(self, n, c, k, hw, kernel, dtype=torch.float32):
        self.pad = kernel // 2
        self.kernel = kernel
        self.x0 = torch.randn(n, c, hw, hw, dtype=dtype)
        self.w1 = torch.randn(k, c, kernel, kernel, dtype=dtype) / (c * kernel * kernel) ** 0.5
        self.w2 = torch.randn(k, k, kernel, kernel, dtype=dtype) / (k * kernel * kernel) ** 0.5
        self.g1, self.b1 = torch.rand(k, dtype=dtype) + 0.5, torch.randn(k, dtype=dtype) * 0.5
        self.g2, self.b2 = torch.rand(k, dtype=dtype) + 0.5, torch.randn(k, dtype=dtype) * 0.5

    @property
    def params(self):
        return [self.x0, self.w1, self.g1, self.b1, self.w2, self.g2, self.b2]

    def torch_graph(self):
        """Leaves (requiring grad), the output, and the bytes autograd saved for backward."""
        leaves = [t.clone().requires_grad_() for t in self.params]
        x0, w1, g1, b1, w2, g2, b2 = leaves
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            a1 = torch.relu(F.batch_norm(F.conv2d(x0, w1, padding=self.pad), None, None, g1, b1, training=True))
            out = torch.relu(F.batch_norm(F.conv2d(a1, w2, padding=self.pad), None, None, g2, b2, training=True))
        return leaves, out, sum(saved.values())

    @torch.no_grad()
    def forward(self):
        x0, w1, g1, b1, w2, g2, b2 = self.params
        y1, s1, m1 = rbn.conv2d_stats(x0, w1, padding=self.pad)
        bn1 = rbn.bn_finalize(s1, m1, rbn.tile_count(y1), g1, b1)
        y2, s2, m2 = rbn.bn_relu_conv2d_stats(y1, bn1.scale, bn1.shift, w2, padding=self.pad)
        bn2 = rbn.bn_finalize(s2, m2, rbn.tile_count(y2), g2, b2)
        out = rbn.bn_relu(y2, bn2.scale, bn2.shift)
        return out, (x0, w1, w2, y1, bn1, y2, bn2)

    @torch.no_grad()
    def backward(self, dout, saved):
        x0, w1, w2, y1, bn1, y2, bn2 = saved
        k, p = self.kernel, self.pad
        dz2, tb2, tg2 = rbn.bn_relu_backward_stats(dout, y2, bn2)
        gc2 = rbn.bn_backward_finalize(tb2, tg2, rbn.tile_count(y2), bn2)
        dy2 = rbn.bn_input_grad(dz2, y2, gc2)
        dw2 = rbn.bn_relu_conv2d_wgrad(dy2, y1, bn1.scale, bn1.shift, k, padding=p)
        dz1, tb1, tg1 = rbn.conv2d_dgrad_bn_relu(dy2, w2, y1, bn1, padding=p)
        gc1 = rbn.bn_backward_finalize(tb1, tg1, rbn.tile_count(y1), bn1)
        dy1 = rbn.bn_input_grad(dz1, y1, gc1)
        dw1 = rbn.conv2d_wgrad(dy1, x0, k, padding=p)
        dx0 = rbn.conv2d_dgrad(dy1, w1, x0.shape, padding=p)
        return dx0, dw1, gc1.dgamma, gc1.dbeta, dw2, gc2.dgamma, gc2.dbeta


def _saved_bytes_ours(saved) -> int:
    x0, w1, w2, y1, bn1, y2, bn2 = saved
    tensors = [x0, w1, w2, y1, y2, *bn1, *bn2]
    return sum(t.numel() * t.element_size() for t in tensors)


def run(n=8, c=64, k=64, hw=56, kernel=3, reps=15, warmup=3, lead_in=1, settle_ms=0.0) -> dict:
    torch.manual_seed(0)
    chain = _Chain(n, c, k, hw, kernel)
    leaves, out_ref, torch_saved = chain.torch_graph()
    dout = torch.randn_like(out_ref)
    out, saved = chain.forward()

    def ours():
        return chain.backward(dout, saved)

    def torch_autograd():
        for leaf in leaves:
            leaf.grad = None
        out_ref.backward(dout, retain_graph=True)

    grads = ours()  # builds the kernels before timing
    torch_autograd()
    names = ("x0", "w1", "gamma1", "beta1", "w2", "gamma2", "beta2")
    max_diff = {
        name: (g - leaf.grad).abs().max().item() / max(1.0, leaf.grad.abs().max().item())
        for name, g, leaf in zip(names, grads, leaves)
    }
    times = time_sides({"tvm_rbn": ours, "torch_autograd": torch_autograd}, reps, warmup, lead_in, settle_ms / 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    geo = Conv2dGeometry(n, c, hw, hw, k, kernel, kernel, (1, 1), (kernel // 2,) * 2)
    geo2 = Conv2dGeometry(n, k, hw, hw, k, kernel, kernel, (1, 1), (kernel // 2,) * 2)
    flops = 2 * (geo.flops + geo2.flops)  # dgrad + wgrad of both convs
    return {
        "chain": dict(n=n, c=c, k=k, hw=hw, kernel=kernel, stride=1, padding=kernel // 2, dtype="float32",
                      layers="conv-bn-relu-conv-bn-relu, backward to x0, w1, w2, gamma1/2, beta1/2"),
        "schedule": "default (untuned)",
        "machine": machine(),
        "timing": dict(reps=reps, warmup=warmup, lead_in=lead_in, settle_ms=settle_ms, statistic="median"),
        "max_rel_diff_vs_torch": max_diff,
        "median_s": med,
        "gflops": {name: flops / t / 1e9 for name, t in med.items()},
        "speedup_vs_torch_autograd": med["torch_autograd"] / med["tvm_rbn"],
        "saved_for_backward_bytes": {"tvm_rbn": _saved_bytes_ours(saved), "torch_autograd": torch_saved},
        "times_s": times,
    }


def format_table(r: dict) -> str:
    m, L = r["machine"], r["chain"]
    lines = [
        f"backward chain N{L['n']} C{L['c']} K{L['k']} {L['hw']}x{L['hw']} {L['kernel']}x{L['kernel']} pad "
        f"{L['padding']}, fp32 ({L['layers']}), {r['schedule']}",
        f"machine: {m['cpu']} ({m['family']}), threads: torch {m['torch_threads']}, tvm {m['tvm_threads']}",
        f"timing: median of {r['timing']['reps']} alternating reps after {r['timing']['warmup']} warm-up; "
        f"before each timed call {r['timing']['lead_in']} untimed call(s) of the same side, "
        f"{r['timing']['settle_ms']:g} ms idle",
        f"{'side':<16}{'median ms':>12}{'GFLOP/s':>10}{'saved MiB':>11}",
    ]
    for name, t in r["median_s"].items():
        saved = r["saved_for_backward_bytes"][name] / 2**20
        lines.append(f"{name:<16}{t * 1e3:>12.3f}{r['gflops'][name]:>10.1f}{saved:>11.1f}")
    worst = max(r["max_rel_diff_vs_torch"].values())
    lines.append(
        f"tvm_rbn vs torch autograd: {r['speedup_vs_torch_autograd']:.2f}x; "
        f"max gradient difference {worst:.2e} (relative to max(1, max |grad|))"
    )
    return "\n".join(lines)


def main(argv=None, prog=None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--c", type=int, default=64, help="input channels of conv1")
    ap.add_argument("--k", type=int, default=64, help="output channels of both convs")
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lead-in", type=int, default=1, help="untimed calls of a side before each timed one")
    ap.add_argument("--settle-ms", type=float, default=0.0, help="idle time before each timed call")
    ap.add_argument("--out", default="out/backward_chain.json")
    a = ap.parse_args(argv)
    if a.reps < 10:
        ap.error("--reps must be at least 10")
    r = run(a.n, a.c, a.k, a.hw, a.kernel, a.reps, a.warmup, a.lead_in, a.settle_ms)
    print(format_table(r))
    print(f"saved {save_json(a.out, r)}")


if __name__ == "__main__":
    main()
