"""Timing in alternation: these machines are noisy, so sides take turns and medians are quoted."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable


def time_alternating(sides: dict[str, Callable[[], object]], reps: int = 15, warmup: int = 3) -> dict[str, dict]:
    """Run each side once per round, `reps` rounds after `warmup`; per side: median and all times (s)."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}


def time_sides(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1, lead_in: int = 1,
               settle_s: float = 0.0) -> dict[str, list[float]]:
    """Alternate the sides (which one goes first alternates too). Before each timed call, the
    same side runs `lead_in` untimed calls (they absorb the other runtime's still-spinning
    threads) and/or the process idles `settle_s`. Per side: the `reps` times (s)."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if settle_s:
                time.sleep(settle_s)
            for _ in range(lead_in):
                sides[name]()
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_times(sides: dict[str, Callable[[], object]], reps: int, **kwargs) -> dict[str, float]:
    """``time_sides``, reduced to the median per side (s)."""
    return {name: statistics.median(ts) for name, ts in time_sides(sides, reps, **kwargs).items()}


def machine() -> dict:
    import torch

    import tvm_rbn
    from tvm_rbn.build.target import cpu_name, host_family

    return {
        "cpu": cpu_name(),
        "family": host_family(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tvm_threads": tvm_rbn.num_threads(),
        "torch": torch.__version__,
    }


def save_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path
