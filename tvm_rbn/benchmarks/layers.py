"""Per-layer benchmark of a model's convolution kernels against PyTorch, in one process.

Lists the distinct convolution kernels one training step of a model from ``tvm_rbn.models``
uses (``tvm_rbn.build.workloads.extract``: every kernel spec with its calls per step), and for
each fused forward / data-gradient / weight-gradient kernel times three sides, alternating:

=========  ======================================  =========================================
kind       tvm_rbn (one fused kernel)              torch_unfused (PyTorch, same work)
=========  ======================================  =========================================
forward    [BN-apply(+ReLU) prologue] + conv       [F.batch_norm (training) + relu] +
           + [statistics epilogue]                 F.conv2d
dgrad      [grad prologue c1*dz + c2*x + c3] +     [aten.native_batch_norm_backward] +
           conv_transpose + [ReLU-mask + BN        torch.nn.grad.conv2d_input +
           partials epilogue]                      [aten.threshold_backward]
wgrad      [grad prologue] + [activation           torch.nn.grad.conv2d_weight (PyTorch keeps
           prologue] + weight gradient             the activation and shares the BN input
                                                   gradient with dgrad: nothing to add)
=========  ======================================  =========================================

and ``onednn``: the convolution alone (F.conv2d, conv2d_input, conv2d_weight) on NCHW tensors,
as eager PyTorch runs it; ``onednn_cl``: the same on channels-last tensors, as torch.compile
runs it on CPU (Inductor converts a conv model's activations to channels-last, which spares
oneDNN its per-call layout reorders; the tensors are converted before timing). Brackets are
present when the kernel has that prologue / epilogue. Each BatchNorm's statistics are computed
once either way: PyTorch's batch_norm computes those of its input, our forward kernel those
of its output; PyTorch's BN backward forms the sums of its dz, our dgrad epilogue those of
the previous BatchNorm.

Our kernel's outputs are allocated per call as the bridge allocates them, from tvm_rbn's
output pool (``runtime/buffers.py``: the memory of large outputs is recycled); PyTorch's
functions allocate theirs from the C heap, where a fresh tensor above glibc's mmap threshold
(32 MiB at most) is new memory whose pages fault on first touch.

Timing: sides alternate (the first side alternates too); before each timed call the same side
runs one untimed call (it absorbs the other runtime's still-spinning threads); median of
--reps. Ratios are torch time / our time (> 1: we are faster); the summary gives each kind's
geometric mean over kernels and the step-weighted total (sum of calls per step x median).

Both runtimes use the same number of threads (PyTorch's, unless --threads sets both; on a
machine shared with other jobs, --threads 1 gives steadier numbers). The JSON records the load
average before and after the run.

    python -m tvm_rbn.benchmarks.layers --model resnet50 --batch 16 --size 224 [--limit N]
        [--kinds forward,dgrad,wgrad] [--reps 5] [--threads T] [--out out/layers_resnet50.json]
        [--plot PNG]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import KernelSpec
from ..ops.conv2d_bn import Conv2dGeometry
from .timing import machine, median_times, save_json

KINDS = {"conv2d_fused": "forward", "conv2d_dgrad": "dgrad", "conv2d_wgrad": "wgrad"}


def geometry(spec: KernelSpec) -> Conv2dGeometry:
    p = spec.kwargs
    return Conv2dGeometry(p["n"], p["c"], p["h"], p["w"], p["k"], p["r"], p["s"], tuple(p["stride"]),
                          tuple(p["padding"]))


def layer_name(geo: Conv2dGeometry) -> str:
    return (f"N{geo.n} C{geo.c} {geo.h}x{geo.w} K{geo.k} {geo.r}x{geo.s}"
            + (f" s{geo.stride[0]}" if geo.stride != (1, 1) else "")
            + (f" p{geo.padding[0]}" if geo.padding != (0, 0) else ""))


def flags(spec: KernelSpec) -> str:
    p = spec.kwargs
    if spec.op == "conv2d_fused":
        pro = {None: "", True: "bn+relu>", False: "bn>"}[p["prologue_relu"]]
        return pro + "conv" + ("+stats" if p["stats"] else "")
    if spec.op == "conv2d_dgrad":
        epi = {None: "", True: ">relu'+bn'", False: ">bn'"}[p["epilogue_relu"]]
        return ("bn'>" if p["grad_prologue"] else "") + "dgrad" + epi + ("+sum" if p.get("accumulate") else "")
    pro = {None: "", True: "bn+relu", False: "bn"}[p["prologue_relu"]]
    return ("bn'," if p["grad_prologue"] else "") + (pro + ">" if pro else "") + "wgrad"


def select(workloads, limit: int | None):
    """Conv kernels a training step calls, grouped by layer geometry; `limit` keeps that many
    layers, evenly spaced over the layers sorted by forward FLOPs x calls."""
    layers: dict[Conv2dGeometry, list] = {}
    for spec, count in workloads:
        if spec.op in KINDS and count > 0:
            layers.setdefault(geometry(spec), []).append((spec, count))
    order = sorted(layers, key=lambda g: -g.flops * max(c for _, c in layers[g]))
    if limit and limit < len(order):
        step = len(order) / limit
        order = [order[int(i * step)] for i in range(limit)]
    return [(geo, sorted(layers[geo], key=lambda sc: list(KINDS).index(sc[0].op))) for geo in order]


class _Case:
    """Inputs of one kernel and its PyTorch counterparts (realistic BatchNorm coefficients:
    positive scales, shifts that leave about half the ReLU active)."""

    def __init__(self, spec: KernelSpec):
        self.spec, self.geo = spec, geometry(spec)
        p = spec.kwargs
        g = self.geo
        self.dtype = getattr(torch, p["dtype"])
        r = lambda *s: torch.randn(*s, dtype=self.dtype)  # noqa: E731
        self.x = r(g.n, g.c, g.h, g.w)
        self.w = r(g.k, g.c, g.r, g.s) / math.sqrt(g.c * g.r * g.s)
        self.grad = r(*g.out_shape)
        self.stride, self.padding = g.stride, g.padding
        # BatchNorm of the conv's input (forward prologue, dgrad epilogue, wgrad prologue)
        self.in_mean, self.in_var = self.x.mean((0, 2, 3)), self.x.var((0, 2, 3), unbiased=False)
        self.in_invstd = 1 / torch.sqrt(self.in_var + 1e-5)
        self.gamma, self.beta = torch.rand(g.c, dtype=self.dtype) + 0.5, r(g.c) * 0.5
        self.scale = self.gamma * self.in_invstd
        self.shift = self.beta - self.in_mean * self.scale
        self.z = self.x * self.scale[:, None, None] + self.shift[:, None, None]  # what PyTorch kept
        self.a = torch.relu(self.z)
        # BatchNorm of the conv's output (grad prologue): dz at its output, raw conv output y
        self.y = r(*g.out_shape)
        self.y_mean, self.y_invstd = self.y.mean((0, 2, 3)), 1 / torch.sqrt(self.y.var((0, 2, 3), unbiased=False) + 1e-5)
        self.y_gamma = torch.rand(g.k, dtype=self.dtype) + 0.5
        self.c1 = self.y_gamma * self.y_invstd
        self.c2 = -self.c1 * self.y_invstd * r(g.k) / (g.n * g.out_shape[2] * g.out_shape[3])
        self.c3 = -self.c1 * r(g.k) / (g.n * g.out_shape[2] * g.out_shape[3]) - self.c2 * self.y_mean
        # the running sum a data gradient adds to (a DenseNet block's buffer gradient)
        self.acc = r(g.n, g.c, g.h, g.w) if spec.kwargs.get("accumulate") else None

    # --- ours ------------------------------------------------------------------------------
    def ours(self):
        """One kernel call, its outputs allocated per call as the bridge does (from the
        output pool; PyTorch's sides allocate theirs from the C heap)."""
        from ..build.provider import kernel
        from ..runtime import buffers

        fn = kernel(self.spec)
        p, g = self.spec.kwargs, self.geo
        grad_args = [self.grad] if not p.get("grad_prologue") else [self.grad, self.y, self.c1, self.c2, self.c3]
        if self.spec.op == "conv2d_fused":
            args = [self.x] + ([self.scale, self.shift] if p["prologue_relu"] is not None else []) + [self.w]
            outs = [g.out_shape] + ([(g.n, g.k), (g.n, g.k)] if p["stats"] else [])
        elif self.spec.op == "conv2d_dgrad":
            args = grad_args + [self.w]
            if p["epilogue_relu"] is None:
                outs = [(g.n, g.c, g.h, g.w)]
            else:
                args += [self.x] + ([self.scale, self.shift] if p["epilogue_relu"] else [])
                args += [self.in_mean, self.in_invstd] + ([self.acc] if p.get("accumulate") else [])
                outs = [(g.n, g.c, g.h, g.w), (g.n, g.c), (g.n, g.c)]
        else:
            args = grad_args + [self.x] + ([self.scale, self.shift] if p["prologue_relu"] is not None else [])
            outs = [(g.k, g.c, g.r, g.s)]
        fixed = {}  # channel slices of a wider buffer (DenseNet blocks): allocated once per block
        for index, total in p.get("views") or ():
            shape = outs[index - len(args)] if index >= len(args) else tuple(args[index].shape)
            buffer = torch.zeros(shape[0], total, *shape[2:], dtype=self.dtype)
            fixed[index] = buffer[:, total - shape[1]:]
            if index < len(args):
                fixed[index].copy_(args[index])
        out_views = {i - len(args): t for i, t in fixed.items() if i >= len(args)}
        args = [fixed.get(i, a) for i, a in enumerate(args)]

        def call():
            fresh = [out_views[i] if i in out_views else buffers.empty(s, self.dtype) for i, s in enumerate(outs)]
            fn(*args, *fresh)

        return call

    # --- PyTorch ---------------------------------------------------------------------------
    def onednn(self):
        g = self.geo
        if self.spec.op == "conv2d_fused":
            return lambda: F.conv2d(self.a, self.w, stride=self.stride, padding=self.padding)
        if self.spec.op == "conv2d_dgrad":
            return lambda: torch.nn.grad.conv2d_input((g.n, g.c, g.h, g.w), self.w, self.grad,
                                                      stride=self.stride, padding=self.padding)
        return lambda: torch.nn.grad.conv2d_weight(self.a, self.w.shape, self.grad, stride=self.stride,
                                                   padding=self.padding)

    def onednn_channels_last(self):
        g, cl = self.geo, torch.channels_last
        a, w, grad = (t.contiguous(memory_format=cl) for t in (self.a, self.w, self.grad))
        if self.spec.op == "conv2d_fused":
            return lambda: F.conv2d(a, w, stride=self.stride, padding=self.padding)
        if self.spec.op == "conv2d_dgrad":
            return lambda: torch.nn.grad.conv2d_input((g.n, g.c, g.h, g.w), w, grad, stride=self.stride,
                                                      padding=self.padding)
        return lambda: torch.nn.grad.conv2d_weight(a, w.shape, grad, stride=self.stride, padding=self.padding)

    def torch_unfused(self):
        p, g = self.spec.kwargs, self.geo
        if self.spec.op == "conv2d_fused":
            relu = p["prologue_relu"]

            def fwd():
                a = self.x
                if relu is not None:
                    a = F.batch_norm(a, None, None, self.gamma, self.beta, True, 0.1, 1e-5)
                    if relu:
                        a = torch.relu(a)
                return F.conv2d(a, self.w, stride=self.stride, padding=self.padding)

            return fwd
        if self.spec.op == "conv2d_dgrad":
            bnb = torch.ops.aten.native_batch_norm_backward.default
            thr = torch.ops.aten.threshold_backward.default

            def dgrad():
                grad = self.grad
                if p["grad_prologue"]:
                    grad = bnb(self.grad, self.y, self.y_gamma, None, None, self.y_mean, self.y_invstd, True, 1e-5,
                               [True, False, False])[0]
                da = torch.nn.grad.conv2d_input((g.n, g.c, g.h, g.w), self.w, grad, stride=self.stride,
                                                padding=self.padding)
                if p["epilogue_relu"]:
                    da = thr(da, self.z, 0)
                if p.get("accumulate"):  # the BatchNorm's input gradient at fixed statistics, summed
                    da = torch.addcmul(self.acc, da, self.scale[:, None, None])
                return da

            return dgrad
        return self.onednn()


def _gmean(values) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def run(model_name: str, batch: int, size: int, limit: int | None = None, kinds=("forward", "dgrad", "wgrad"),
        reps: int = 5, progress=print) -> dict:
    from ..build import provider
    from ..build.workloads import extract
    from ..models import MODELS

    torch.manual_seed(0)
    load_before = os.getloadavg()
    model = MODELS[model_name]()
    workloads = extract(model, (batch, 3, size, size))
    layers = select(workloads, limit)
    specs = [spec for _, group in layers for spec, _ in group if KINDS[spec.op] in kinds]
    start = time.perf_counter()
    provider.prepare(specs)  # one library (from the cache when built before)
    build_s = time.perf_counter() - start
    progress(f"{len(layers)} layers, {len(specs)} kernels ready in {build_s:.1f} s")
    rows = []
    with torch.no_grad():
        for geo, group in layers:
            for spec, count in group:
                kind = KINDS[spec.op]
                if kind not in kinds:
                    continue
                case = _Case(spec)
                med = median_times({"tvm_rbn": case.ours(), "torch_unfused": case.torch_unfused(),
                                    "onednn": case.onednn(), "onednn_cl": case.onednn_channels_last()}, reps)
                row = {
                    "layer": layer_name(geo), "kind": kind, "kernel": flags(spec), "calls_per_step": count,
                    "gflop": geo.flops / 1e9, "spec": spec.key,
                    "median_ms": {k: v * 1e3 for k, v in med.items()},
                    "gflops": {k: geo.flops / v / 1e9 for k, v in med.items()},
                    "vs_torch_unfused": med["torch_unfused"] / med["tvm_rbn"],
                    "vs_onednn": med["onednn"] / med["tvm_rbn"],
                    "vs_onednn_cl": med["onednn_cl"] / med["tvm_rbn"],
                }
                rows.append(row)
                progress(_format_row(row))
    summary = {}
    for kind in kinds:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        total = {side: sum(r["calls_per_step"] * r["median_ms"][side] for r in sel) for side in sel[0]["median_ms"]}
        summary[kind] = {
            "kernels": len(sel),
            "geomean_vs_torch_unfused": _gmean(r["vs_torch_unfused"] for r in sel),
            "geomean_vs_onednn": _gmean(r["vs_onednn"] for r in sel),
            "geomean_vs_onednn_cl": _gmean(r["vs_onednn_cl"] for r in sel),
            "step_weighted_ms": total,
            "step_weighted_vs_torch_unfused": total["torch_unfused"] / total["tvm_rbn"],
            "step_weighted_vs_onednn": total["onednn"] / total["tvm_rbn"],
            "step_weighted_vs_onednn_cl": total["onednn_cl"] / total["tvm_rbn"],
            "slowest_vs_torch_unfused": sorted(
                ({"layer": r["layer"], "kernel": r["kernel"], "ratio": r["vs_torch_unfused"]} for r in sel),
                key=lambda d: d["ratio"])[:3],
        }
    from tvm_rbn.schedules import SCHEDULE_VERSION

    step_gflop = sum(geo.flops * count for geo, group in select(workloads, None) for _, count in group) / 1e9
    return {
        "model": model_name, "input_shape": [batch, 3, size, size], "dtype": "float32",
        "layers_selected": len(layers), "limit": limit, "schedules": SCHEDULE_VERSION,
        "machine": machine(), "timing": {"reps": reps, "warmup": 1, "lead_in": 1, "statistic": "median",
                                          "alternating": True},
        "build_s": build_s, "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": rows, "summary": summary, "headroom": headroom(rows, step_gflop),
    }


def headroom(rows: list[dict], step_gflop: float) -> dict:
    """What the measured kernels leave to gain: per step (calls x median), our kernels against
    the fastest side measured for each kernel's work. The oneDNN sides time the convolution
    alone, so where one of them is fastest the figure is a bound no known kernel reaches with
    the BatchNorm work included. `flop_share`: these rows' share of the step's convolution
    FLOPs (1.0 when every layer was measured)."""
    ours = sum(r["calls_per_step"] * r["median_ms"]["tvm_rbn"] for r in rows)
    fastest = {}
    best_ms = 0.0
    for r in rows:
        side = min(r["median_ms"], key=r["median_ms"].get)
        fastest[side] = fastest.get(side, 0) + 1
        best_ms += r["calls_per_step"] * r["median_ms"][side]
    gflop = sum(r["calls_per_step"] * r["gflop"] for r in rows)
    return {
        "ours_ms": ours, "fastest_ms": best_ms, "gain_ms": ours - best_ms, "fastest_side_counts": fastest,
        "gflop": gflop, "flop_share": gflop / step_gflop if step_gflop else None,
        "gflops_ours": gflop / ours * 1e3 if ours else None,
        "gflops_fastest": gflop / best_ms * 1e3 if best_ms else None,
    }


def _format_row(r: dict) -> str:
    m = r["median_ms"]
    return (f"{r['layer']:<28}{r['kind']:<8}{r['kernel']:<22}{r['calls_per_step']:>3}{r['gflop']:>7.2f}"
            f"{m['tvm_rbn']:>9.2f}{m['torch_unfused']:>9.2f}{m['onednn']:>9.2f}{m['onednn_cl']:>9.2f}"
            f"{r['vs_torch_unfused']:>7.2f}x{r['vs_onednn']:>7.2f}x{r['vs_onednn_cl']:>7.2f}x")


HEADER = (f"{'layer':<28}{'kind':<8}{'kernel':<22}{'#':>3}{'GFLOP':>7}{'ours ms':>9}{'torch ms':>9}"
          f"{'onednn':>9}{'dnn cl':>9}{'vs torch':>8}{'vs dnn':>8}{'vs cl':>8}")


def format_summary(r: dict) -> str:
    m = r["machine"]
    load = r["load_average"]
    lines = [f"{r['model']} {tuple(r['input_shape'])} fp32, schedules {r['schedules']}; {m['cpu']} ({m['family']}), "
             f"threads torch {m['torch_threads']} / tvm {m['tvm_threads']}; median of {r['timing']['reps']} "
             f"alternating reps; load average {load['before'][0]:.1f} -> {load['after'][0]:.1f}",
             f"{'kind':<9}{'kernels':>8}{'gmean vs torch':>16}{'gmean vs onednn':>17}{'vs onednn cl':>14}"
             f"{'step ms ours':>14}{'torch':>9}{'onednn':>9}{'dnn cl':>9}{'step vs torch':>15}{'vs dnn cl':>11}"]
    for kind, s in r["summary"].items():
        t = s["step_weighted_ms"]
        lines.append(f"{kind:<9}{s['kernels']:>8}{s['geomean_vs_torch_unfused']:>15.2f}x{s['geomean_vs_onednn']:>16.2f}x"
                     f"{s['geomean_vs_onednn_cl']:>13.2f}x{t['tvm_rbn']:>14.1f}{t['torch_unfused']:>9.1f}"
                     f"{t['onednn']:>9.1f}{t['onednn_cl']:>9.1f}{s['step_weighted_vs_torch_unfused']:>14.2f}x"
                     f"{s['step_weighted_vs_onednn_cl']:>10.2f}x")
    h = r.get("headroom")
    if h and h["ours_ms"]:
        sides = ", ".join(f"{side} {n}" for side, n in sorted(h["fastest_side_counts"].items(), key=lambda kv: -kv[1]))
        lines.append(f"these {len(r['rows'])} kernels ({h['flop_share']:.0%} of the step's convolution FLOPs): ours "
                     f"{h['ours_ms']:.1f} ms per step ({h['gflops_ours']:.0f} GFLOP/s), the fastest side of each "
                     f"{h['fastest_ms']:.1f} ms ({h['gflops_fastest']:.0f} GFLOP/s; fastest: {sides})")
    return "\n".join(lines)


def plot(r: dict, path: str | Path) -> Path:
    """Bar chart of the ratios per kernel (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(rows)), 5))
    xs = range(len(rows))
    colors = {"forward": "tab:blue", "dgrad": "tab:orange", "wgrad": "tab:green"}
    ax.bar([x - 0.27 for x in xs], [row["vs_torch_unfused"] for row in rows], 0.27,
           color=[colors[row["kind"]] for row in rows], label="vs torch unfused")
    ax.bar(list(xs), [row["vs_onednn"] for row in rows], 0.27,
           color=[colors[row["kind"]] for row in rows], alpha=0.45, label="vs oneDNN conv alone")
    ax.bar([x + 0.27 for x in xs], [row["vs_onednn_cl"] for row in rows], 0.27, hatch="//", fill=False,
           edgecolor=[colors[row["kind"]] for row in rows], label="vs oneDNN conv alone, channels-last")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up (torch time / tvm_rbn time)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{row['layer']} {row['kind']}" for row in rows], rotation=90, fontsize=6)
    ax.set_title(f"{r['model']} {tuple(r['input_shape'])}: per-kernel speed-up (blue fwd, orange dgrad, "
                 f"green wgrad; solid vs torch unfused, light vs oneDNN, hatched vs oneDNN channels-last)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None, prog=None) -> dict:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=None, help="benchmark this many layers (evenly spaced by FLOPs)")
    ap.add_argument("--kinds", default="forward,dgrad,wgrad")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: PyTorch's)")
    ap.add_argument("--out", default=None, help="JSON path (default out/layers_<model>_b<batch>_<size>.json)")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    a = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    if a.threads:
        if "TVM_NUM_THREADS" in os.environ and os.environ["TVM_NUM_THREADS"] != str(a.threads):
            raise SystemExit("--threads conflicts with TVM_NUM_THREADS in the environment")
        os.environ["TVM_NUM_THREADS"] = str(a.threads)  # read when TVM's thread pool starts
        torch.set_num_threads(a.threads)
    print(HEADER)
    r = run(a.model, a.batch, a.size, a.limit, kinds, a.reps)
    print(format_summary(r))
    out = Path(a.out or f"out/layers_{a.model}_b{a.batch}_{a.size}.json")
    print(f"saved {save_json(out, r)}")
    print(f"saved {plot(r, a.plot or out.with_suffix('.png'))}")
    return r


if __name__ == "__main__":
    main()
