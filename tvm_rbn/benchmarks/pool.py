"""The output pool's settings against each other: restructured training steps, in one run.

    python -m tvm_rbn.benchmarks.pool [--model resnet50 densenet121] [--batch 16] [--size 224]
                                      [--steps 7] [--warmup 3] [--out out/bench_pool]

Sides, each a copy of the restructured model with a pool of its own (``buffers.using`` a
``PoolState``): ``off`` (no pooling: glibc's fresh mappings), ``capped`` (headroom 1: the pool
never holds more than the most its blocks were in use at once) and ``default`` (headroom
``buffers.HEADROOM``). After the warm-up steps the sides take turns, one step each per round;
medians, the blocks each side created per measured step, and the bytes its pool holds.
Saved: ``OUT.json``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from ..runtime import buffers
from .step import _library, _trainer
from .timing import machine, save_json

SIDES = {"off": {"enabled": False}, "capped": {"headroom": 1.0}, "default": {"headroom": buffers.HEADROOM}}


def run_model(name: str, batch: int, size: int, steps: int, warmup: int, measure: bool = True) -> dict:
    import tvm_rbn
    from ..models import MODELS

    torch.manual_seed(0)
    base = MODELS[name]()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    lib, _ = _library(base, x.shape, measure)
    sides = {side: {"step": _trainer(tvm_rbn.restructure(copy.deepcopy(base).train(), library=lib), x, y),
                    "state": buffers.PoolState(**SIDES[side]), "times": [], "created": 0} for side in SIDES}

    def one(side: str, timed: bool) -> None:
        s = sides[side]
        with buffers.using(s["state"]):
            before = s["state"].created
            start = time.perf_counter()
            s["step"]()
            elapsed = time.perf_counter() - start
        if timed:
            s["times"].append(elapsed)
            s["created"] += s["state"].created - before

    for _ in range(warmup):
        for side in sides:
            one(side, False)
    for _ in range(steps):
        for side in sides:
            one(side, True)
    return {"model": name, "batch": batch, "size": size, "steps": steps, "warmup": warmup,
            "sides": {side: {"median_s": statistics.median(s["times"]), "times_s": s["times"],
                             "blocks_created_per_step": s["created"] / steps,
                             "pool_bytes": s["state"].held(), "high_water_bytes": s["state"].high_water}
                      for side, s in sides.items()}}


def format_table(r: dict) -> str:
    lines = [f"{r['model']}, batch {r['batch']}, {r['size']}x{r['size']}: median of {r['steps']} steps per side",
             f"{'side':<10}{'step s':>9}{'vs off':>8}{'blocks made/step':>18}{'pool MB':>9}{'high water MB':>15}"]
    off = r["sides"]["off"]["median_s"]
    for side, s in r["sides"].items():
        lines.append(f"{side:<10}{s['median_s']:>9.3f}{off / s['median_s']:>7.2f}x{s['blocks_created_per_step']:>18.1f}"
                     f"{s['pool_bytes'] / 1e6:>9.0f}{s['high_water_bytes'] / 1e6:>15.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..models import MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["resnet50", "densenet121"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-layer-choice", action="store_true",
                    help="run every restructured layer on tvm_rbn's kernels (default: as `build` decides)")
    ap.add_argument("--out", default="out/bench_pool")
    a = ap.parse_args(argv)
    results = []
    for name in a.model:
        results.append(run_model(name, a.batch, a.size, a.steps, a.warmup, not a.no_layer_choice))
        print(format_table(results[-1]), flush=True)
    print(f"saved {save_json(Path(a.out).with_suffix('.json'), {'machine': machine(), 'results': results})}")
    return 0


if __name__ == "__main__":
    main()
