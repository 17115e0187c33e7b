"""The kernels a model needs at an input shape, and one library that holds them all."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..kernels import KernelSpec
from . import provider


def extract(model: torch.nn.Module, input_shape, dtype=torch.float32) -> list[tuple[KernelSpec, int]]:
    """Every fused kernel one training step (forward + backward) and one eval forward call,
    deduplicated, with how many times a training step calls it (eval-only kernels: 0).

    Runs a restructured copy of the model with kernels recorded but not executed; the
    model itself is not touched.
    """
    from ..bridge import restructure

    work = restructure(copy.deepcopy(model))
    x = torch.zeros(tuple(input_shape), dtype=dtype)
    work.train()
    with provider.record(dry_run=True) as train_counts:
        out = work(x)
        out.float().sum().backward()
    work.eval()
    with provider.record(dry_run=True) as eval_counts, torch.no_grad():
        work(x)
    specs = dict(train_counts)
    for spec in eval_counts:
        specs.setdefault(spec, 0)
    return sorted(specs.items(), key=lambda kv: (-kv[1], kv[0].key))


def build_for_model(model: torch.nn.Module, input_shape, dtype=torch.float32, out_dir=None,
                    tuning_logs=None) -> Path:
    """Build one library with every kernel `model` needs at `input_shape`.

    Into `out_dir` when given (a folder to ship: kernels.so + manifest.json), else into the
    on-disk cache; tuned from `tuning_logs` (a tuning-log folder) where it has records.
    Returns the library folder, for ``restructure(model, library=...)``.
    """
    from ..tuning import records
    from .compile import build_cached, compile_library

    specs = [spec for spec, _ in extract(model, input_shape, dtype)]
    logs = Path(tuning_logs) if tuning_logs is not None else None
    if out_dir is None:
        return build_cached(specs, logs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compile_library(specs, out, tuning_logs=logs if logs is not None and records.has_records(logs) else None)
    return out
