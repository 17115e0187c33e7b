"""Per-layer cost decision at build time: our kernels or PyTorch's, whichever is faster.

DESIGN.md section 6: a fused kernel that still loses to PyTorch's unfused sequence for its
layer must not run. ``measure`` times, for every restructured BatchNorm of a model, the
convolution kernels that one training step runs for it (``tvm_rbn.report``'s attribution:
the conv producing its input, with the statistics epilogue and the previous BatchNorm's
prologue, forward, data gradient and weight gradient; a conv that only carries its apply
prologue) against PyTorch's unfused sequence for the same work (BatchNorm + ReLU + oneDNN
conv, forward and backward: ``tvm_rbn.benchmarks.layers``), both on PyTorch's thread count,
sides alternating, median of `reps`, each kernel weighted by its calls per step; a close call
(a ratio within CLOSE of the threshold) is re-timed with more reps before it is decided. A
BatchNorm whose kernels take more than (1 + margin) x PyTorch's time is marked "pytorch":
``restructure(model, library=...)`` then leaves it, and the conv producing its input, in
PyTorch. A DenseNet block is decided as a whole (its block buffer holds all its layers or
none; its kernels are attributed to the block): every BatchNorm of it gets the block's sums.

Decisions are per layer and independent: each is measured with its neighbours restructured,
and what a PyTorch layer costs its neighbours is not counted (the BatchNorm before it applies
into a materialized activation instead of the conv's prologue: one standalone pass, as
PyTorch's own BatchNorm makes), nor what the runtimes' taking turns costs: MARGIN stands for
them, measured in training steps. A BatchNorm with no convolution kernel (statistics and apply
both standalone) stays "tvm".
"""
from __future__ import annotations

import copy
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field

import torch

# ours may be this much slower, timed alone, before a layer goes to PyTorch. Not only timing
# noise: a layer left to PyTorch costs the step more than its kernels' difference, which the
# isolated timing does not see (among the likely causes: the two runtimes taking turns on the
# cores, the BatchNorm before it applied as a standalone pass). Measured on the Zen 4 machine
# (2026-12-04): resnet50's library with 7 BatchNorms decided for PyTorch at a 3% margin (ours
# 3.5-3.9% slower alone; 10.6 ms per step in all) against the same kernels with all 53 on ours,
# 11 alternating training steps: 2.705 vs 2.435 s and 2.702 vs 2.618 s, all-ours faster both times.
MARGIN = 0.10
REPS = 5
# a layer whose first ratio (ours / PyTorch) lies within this of the threshold 1 + MARGIN is
# a close call: its kernels get RECHECK x reps more alternating reps, pooled with the first,
# before it is decided (a single pass of 5 reps flipped 6 of resnet50's BatchNorms between
# two builds on this noisy machine)
CLOSE = 0.15
RECHECK = 2
_load: list[float] = []  # 1-minute load average before and after the last measure() (a busy machine: noisy)


@dataclass
class Site:
    """BatchNorms decided together (one, or a dense block's) and their conv kernels."""

    names: list[str]
    kernels: Counter = field(default_factory=Counter)  # conv kernel spec -> calls per training step
    dense_block: str | None = None


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def sites(model: torch.nn.Module, input_shape, dtype=torch.float32) -> list[Site]:
    """The restructured BatchNorms of `model` with the conv kernels one training step runs for
    each (a dry run: nothing is built or executed; the model is not touched)."""
    from ..benchmarks.layers import KINDS
    from ..bridge import _REPORT_ATTR, restructure
    from . import provider

    work = restructure(copy.deepcopy(model))
    work.train()
    owners: dict[int, Counter] = {}
    with provider.record(dry_run=True, by_owner=owners):
        work(torch.zeros(tuple(input_shape), dtype=dtype)).float().sum().backward()
    groups: dict[int, Site] = {}
    for row, kernels in getattr(work, _REPORT_ATTR):
        if not row.restructured:
            continue
        site = groups.setdefault(id(kernels), Site([]))
        site.names.append(row.name)
        if not site.kernels:
            site.kernels = Counter({s: n for s, n in owners.get(id(kernels), {}).items() if s.op in KINDS})
    for site in groups.values():
        if len(site.names) > 1:  # one kernel set for several BatchNorms: a dense block
            site.dense_block = _common_prefix(site.names) or site.names[0]
    return list(groups.values())


def measure(model: torch.nn.Module, input_shape, dtype=torch.float32, reps: int = REPS, margin: float = MARGIN,
            progress=None) -> dict[str, dict]:
    """{BatchNorm name: {"ours_ms", "torch_ms", "choice": "tvm"|"pytorch", "kernel_calls"[, "dense_block"]}}.

    Times per training step (ms, calls x median). Kernels come from the loaded libraries, else
    the cache, else a fresh build: load the library being decided on first
    (``provider.add_library``) so its kernels are the ones timed.
    """
    from ..benchmarks.layers import _Case
    from ..benchmarks.timing import time_sides
    from . import provider

    _load[:] = [os.getloadavg()[0]]
    found = sites(model, input_shape, dtype)
    specs = list(dict.fromkeys(s for site in found for s in site.kernels))
    provider.prepare(specs)
    times: dict = {}  # spec -> side -> every rep (s)

    def time_kernels(chosen, n_reps, what):
        with torch.no_grad():
            for i, spec in enumerate(chosen):
                case = _Case(spec)
                got = time_sides({"tvm_rbn": case.ours(), "torch_unfused": case.torch_unfused()}, n_reps)
                for side, ts in got.items():
                    times.setdefault(spec, {}).setdefault(side, []).extend(ts)
                if progress:
                    progress(f"{what} kernel {i + 1}/{len(chosen)}")

    def per_step_ms(site, side):
        return 1e3 * sum(n * statistics.median(times[s][side]) for s, n in site.kernels.items())

    time_kernels(specs, reps, "timed")
    close = [site for site in found if site.kernels and abs(
        per_step_ms(site, "tvm_rbn") / per_step_ms(site, "torch_unfused") - (1 + margin)) <= CLOSE]
    recheck = list(dict.fromkeys(s for site in close for s in site.kernels))
    if recheck:
        time_kernels(recheck, RECHECK * reps, "re-timed (close call)")
    _load.append(os.getloadavg()[0])
    layers = {}
    for site in found:
        ours, theirs = per_step_ms(site, "tvm_rbn"), per_step_ms(site, "torch_unfused")
        choice = "pytorch" if site.kernels and ours > (1 + margin) * theirs else "tvm"
        row = {"ours_ms": round(ours, 4), "torch_ms": round(theirs, 4), "choice": choice,
               "kernel_calls": sum(site.kernels.values()), "reps": min(
                   (len(times[s]["tvm_rbn"]) for s in site.kernels), default=0)}
        if site.dense_block:
            row["dense_block"] = site.dense_block
        for name in site.names:
            layers[name] = dict(row)
    return layers


def conditions(input_shape, dtype, reps: int, margin: float) -> dict:
    """How the last `measure` measured, for the manifest."""
    import tvm_rbn

    return {"input_shape": list(input_shape), "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "margin": margin, "close_call": {"band": CLOSE, "extra_reps": RECHECK * reps},
            "statistic": "median of alternating reps, x calls per training step",
            "threads": {"torch": torch.get_num_threads(), "tvm": tvm_rbn.num_threads()},
            "load_average": {"before": _load[0], "after": _load[-1]} if _load else None}
