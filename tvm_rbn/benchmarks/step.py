"""Training steps end to end: restructured vs PyTorch eager vs torch.compile, in one run.

    python -m tvm_rbn.benchmarks.step --model resnet50 densenet121 --batch 16 --size 224
                                      [--steps 5] [--warmup 2] [--no-compile] [--out out/step]

One step = zero_grad, forward, cross-entropy loss, backward, SGD update (momentum 0.9,
weight decay 1e-4), fp32. Three copies of the model start from the same weights: PyTorch
eager, ``torch.compile`` (default mode; its compilation is the first warm-up step and is
reported apart), and ``tvm_rbn.restructure`` with a kernel library built beforehand as
``python -m tvm_rbn build`` does: from the committed tuning logs, and with each BatchNorm's
kernels timed against PyTorch's layer so that layers where ours lose run in PyTorch
(``--no-layer-choice``: all on ours). Build time is reported apart, with how many kernels were
tuned, taken from their structure class, or default, and how many BatchNorms run in PyTorch. After the warm-up steps the sides take turns, one step
each per round, and the median over the rounds is quoted. Everything runs at torch's thread
count, TVM's pool sized to match.

Also per model: the BatchNorm traffic model (``traffic``), and with ``--memory`` the peak
memory of a step for eager and restructured (``memory``, each in a fresh process).
Saved: ``OUT.json`` and ``OUT.png`` (speedups per model).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .timing import machine, save_json


def _trainer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _library(model, input_shape, measure: bool) -> tuple[Path, dict]:
    """The kernel library as `python -m tvm_rbn build` makes it: tuned from the committed logs
    and, with `measure`, each BatchNorm's kernels timed against PyTorch's layer (the slower
    side's layers run in PyTorch)."""
    import json

    from ..build import provider
    from ..build.workloads import build_for_model

    start = time.perf_counter()
    lib = build_for_model(model, input_shape, tuning_logs=provider.tuning_logs(), measure=measure)
    manifest = json.loads((lib / "manifest.json").read_text())
    kinds = [k.get("schedule", "tuned" if k["tuned"] else "default") for k in manifest["kernels"]]
    layers = manifest.get("layers") or {}
    return lib, {"seconds": time.perf_counter() - start, "kernels": len(kinds),
                 **{kind: kinds.count(kind) for kind in ("tuned", "class", "default")},
                 "layers_measured": len(layers),
                 "layers_in_pytorch": sorted(n for n, row in layers.items() if row["choice"] == "pytorch")}


def run_model(name: str, batch: int, size: int, steps: int, warmup: int, compile_: bool, measure: bool = True) -> dict:
    import tvm_rbn
    from ..models import MODELS

    torch.manual_seed(0)
    base = MODELS[name]()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    lib, build = _library(base, x.shape, measure)

    sides = {"eager": _trainer(copy.deepcopy(base).train(), x, y)}
    compile_s = None
    if compile_:
        compiled = torch.compile(copy.deepcopy(base).train())
        sides["torch.compile"] = _trainer(compiled, x, y)
        start = time.perf_counter()
        sides["torch.compile"]()
        compile_s = time.perf_counter() - start
    # without the layer choice: the kernels of the library, none of its per-layer decisions
    ours = tvm_rbn.restructure(copy.deepcopy(base).train(), library=lib if measure else None)
    if not measure:
        from ..build import provider

        provider.add_library(lib)
    sides["tvm_rbn"] = _trainer(ours, x, y)
    coverage = tvm_rbn.report(ours)

    for _ in range(warmup):
        for step in sides.values():
            step()
    times = {side: [] for side in sides}
    losses = {side: [] for side in sides}
    for _ in range(steps):
        for side, step in sides.items():
            start = time.perf_counter()
            loss = step()
            times[side].append(time.perf_counter() - start)
            losses[side].append(loss.item())
    med = {side: statistics.median(ts) for side, ts in times.items()}
    return {
        "model": name, "batch": batch, "size": size, "dtype": "float32", "steps": steps, "warmup": warmup,
        "median_s": med,
        "speedup_vs_eager": {side: med["eager"] / t for side, t in med.items()},
        "tvm_rbn_vs_compile": med["torch.compile"] / med["tvm_rbn"] if "torch.compile" in med else None,
        "times_s": times, "losses": losses,
        "compile_first_step_s": compile_s,
        "library": build,
        "restructured": f"{sum(r.restructured for r in coverage)}/{len(coverage)}",
    }


def format_table(results: list[dict], m: dict) -> str:
    lines = [f"training step (forward, backward, SGD), fp32; machine: {m['cpu']} ({m['family']}), "
             f"threads: torch {m['torch_threads']}, tvm {m['tvm_threads']}, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', '(default)')}; medians",
             f"{'model':<12}{'batch':>6}{'size':>6}{'eager s':>10}{'compile s':>11}{'tvm_rbn s':>11}"
             f"{'vs eager':>10}{'vs compile':>12}  kernels (tuned/class/default), BatchNorms in PyTorch"]
    for r in results:
        med = r["median_s"]
        comp = med.get("torch.compile")
        lib = r["library"]
        in_pytorch = f"{len(lib['layers_in_pytorch'])}/{lib['layers_measured']}" if lib["layers_measured"] else "-"
        lines.append(
            f"{r['model']:<12}{r['batch']:>6}{r['size']:>6}{med['eager']:>10.3f}"
            f"{(format(comp, '.3f') if comp else '-'):>11}{med['tvm_rbn']:>11.3f}"
            f"{r['speedup_vs_eager']['tvm_rbn']:>9.2f}x"
            f"{(format(r['tvm_rbn_vs_compile'], '.2f') + 'x' if comp else '-'):>12}"
            f"  {lib['tuned']}/{lib['class']}/{lib['default']}, {in_pytorch}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    """Bar chart of each side's speedup over eager, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in ("eager", "torch.compile", "tvm_rbn") if all(s in r["median_s"] for r in results)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(results), 3.6))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        vals = [r["speedup_vs_eager"][side] for r in results]
        bars = ax.bar([j + i * width for j in range(len(results))], vals, width, label=side)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(results))],
                  [f"{r['model']}\nb{r['batch']} {r['size']}x{r['size']}" for r in results])
    ax.set_ylabel("training-step speedup vs PyTorch eager")
    ax.axhline(1.0, color="grey", lw=0.8)
    # headroom above the tallest bar's label for a legend in one row
    top = max(r["speedup_vs_eager"][s] for r in results for s in sides)
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=8, loc="upper center", ncol=len(sides), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None, prog=None) -> dict:
    from ..models import MODELS
    from . import traffic

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["resnet50", "densenet121"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side (median quoted)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--no-layer-choice", action="store_true",
                    help="run every restructured layer on tvm_rbn's kernels (default: as `build` decides "
                         "per layer from measurements)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    ap.add_argument("--out", default="out/step", help="prefix of the .json and .png written")
    a = ap.parse_args(argv)
    m = machine()
    results = []
    for name in a.model:
        r = run_model(name, a.batch, a.size, a.steps, a.warmup, not a.no_compile, not a.no_layer_choice)
        r["traffic"] = traffic.summary(MODELS[name](), (a.batch, 3, a.size, a.size))
        if a.memory:
            from . import memory

            r["memory"] = memory.main(["--model", name, "--batch", str(a.batch), "--size", str(a.size),
                                       "--out", f"{a.out}_memory_{name}.json"])
        results.append(r)
        print(format_table(results[-1:], m), flush=True)
    print()
    print(format_table(results, m))
    for r in results:
        t = r["traffic"]
        print(f"{r['model']}: BatchNorm traffic model {t['eager_mib']:.0f} MiB eager vs {t['tvm_rbn_mib']:.0f} MiB "
              f"restructured per step ({t['ratio']:.2f}x)"
              + (f"; peak memory {r['memory']['step_peak_ratio']:.2f}x eager" if "memory" in r else ""))
    payload = {"machine": m, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results}
    out = Path(a.out)
    print(f"saved {save_json(out.with_suffix('.json'), payload)}")
    print(f"saved {plot(results, out.with_suffix('.png'))}")
    return payload


if __name__ == "__main__":
    main()
