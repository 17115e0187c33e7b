"""The benchmark: ``python -m tvm_rbn bench`` (and ``scripts/bench.sh``).

    python -m tvm_rbn bench [--model resnet50 densenet121] [--batch 16] [--size 224] [--steps 5]
                            [--layers 12] [--no-compile] [--no-memory] [--out out/bench]

For each model, at the batch and size given, fp32, every side at torch's thread count:
  1. end to end (``step``): training steps of tvm_rbn, PyTorch eager and torch.compile in
     alternation, medians; the BatchNorm traffic model; peak memory (``memory``);
  2. per layer (``layers``): each fused kernel (forward, data gradient, weight gradient)
     against PyTorch's unfused sequence for that layer and against the oneDNN convolution
     alone, on NCHW tensors (as eager runs it) and on channels-last ones (as torch.compile
     does), for `--layers` layers spread over the model's FLOPs (0: every layer).
Printed as tables; saved as OUT_step.json/.png and OUT_layers_<model>.json/.png.
  3. where the step's time goes (``OUT_headroom.json``), from the two: our convolution
     kernels' time per step against the fastest side measured for each kernel, the rest of
     the step, and the step each model would take with the fastest measured kernel for every
     convolution (with `--layers 0` only: a sample of layers does not give the whole step).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None, prog=None) -> int:
    from ..models import MODELS
    from . import layers, step
    from .timing import save_json

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["resnet50", "densenet121"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="measured training steps per side (default 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12, help="layers per model in the per-layer table (0: all)")
    ap.add_argument("--reps", type=int, default=5, help="timed reps per kernel in the per-layer table")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    ap.add_argument("--out", default="out/bench", help="prefix of the files written (default out/bench)")
    a = ap.parse_args(argv)
    common = ["--batch", str(a.batch), "--size", str(a.size)]
    step_args = ["--model", *a.model, *common, "--steps", str(a.steps), "--warmup", str(a.warmup),
                 "--out", f"{a.out}_step"]
    steps = step.main(step_args + (["--no-compile"] if a.no_compile else []) + ([] if a.no_memory else ["--memory"]))
    if not a.no_layers:
        layer_runs = [layers.main(["--model", name, *common, "--reps", str(a.reps), "--out",
                                   f"{a.out}_layers_{name}.json"] + (["--limit", str(a.layers)] if a.layers else []))
                      for name in a.model]
        if not a.layers:
            rows = [where_time_goes(s, lr) for s, lr in zip(steps["results"], layer_runs)]
            print(format_where_time_goes(rows))
            print(f"saved {save_json(Path(f'{a.out}_headroom.json'), {'models': rows})}")
    return 0


def where_time_goes(step_result: dict, layer_run: dict) -> dict:
    """Split a measured training step into our convolution kernels (per-layer medians x calls)
    and the rest, and bound the step: the same step with each convolution at the fastest side
    measured for it (the rest kept)."""
    h = layer_run["headroom"]
    if step_result["model"] != layer_run["model"] or h["flop_share"] < 0.999:
        raise ValueError(f"{layer_run['model']}: the per-layer run covers {h['flop_share']:.0%} of the step's "
                         "convolution FLOPs; the step's split needs every layer (--layers 0)")
    med = step_result["median_s"]
    step_s, conv_s = med["tvm_rbn"], h["ours_ms"] / 1e3
    bound_s = step_s - h["gain_ms"] / 1e3
    return {
        "model": step_result["model"], "step_s": step_s, "convolutions_s": conv_s, "rest_s": step_s - conv_s,
        "convolutions_fastest_s": h["fastest_ms"] / 1e3, "step_with_fastest_s": bound_s,
        "gflops_ours": h["gflops_ours"], "gflops_fastest": h["gflops_fastest"],
        "vs_eager": med["eager"] / step_s, "vs_eager_with_fastest": med["eager"] / bound_s,
        "vs_compile": med["torch.compile"] / step_s if "torch.compile" in med else None,
    }


def format_where_time_goes(rows: list[dict]) -> str:
    lines = ["where the step's time goes (convolutions: per-layer medians x calls; the rest: step minus those)",
             f"{'model':<12}{'step s':>8}{'convs s':>9}{'GFLOP/s':>9}{'rest s':>8}{'fastest convs s':>17}"
             f"{'GFLOP/s':>9}{'step with them':>16}{'vs eager':>10}{'with them':>11}"]
    for r in rows:
        lines.append(f"{r['model']:<12}{r['step_s']:>8.3f}{r['convolutions_s']:>9.3f}{r['gflops_ours']:>9.0f}"
                     f"{r['rest_s']:>8.3f}{r['convolutions_fastest_s']:>17.3f}{r['gflops_fastest']:>9.0f}"
                     f"{r['step_with_fastest_s']:>16.3f}{r['vs_eager']:>9.2f}x{r['vs_eager_with_fastest']:>10.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
