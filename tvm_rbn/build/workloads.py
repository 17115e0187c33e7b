"""The kernels a model needs at an input shape, and one library that holds them all."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from ..kernels import KernelSpec
from . import provider


def extract(model: torch.nn.Module, input_shape, dtype=torch.float32, fallback=None) -> list[tuple[KernelSpec, int]]:
    """Every fused kernel one training step (forward + backward) and one eval forward call,
    deduplicated, with how many times a training step calls it (eval-only kernels: 0).

    Runs a restructured copy of the model with kernels recorded but not executed; the
    model itself is not touched. fallback: as for ``restructure``.
    """
    from ..bridge import restructure

    work = restructure(copy.deepcopy(model), fallback=fallback)
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
                    tuning_logs=None, measure=False, reps=None, margin=None, progress=None) -> Path:
    """Build one library with every kernel `model` needs at `input_shape`.

    Into `out_dir` when given (a folder to ship: kernels.so + manifest.json), else into the
    on-disk cache; tuned from `tuning_logs` (a tuning-log folder) where it has records.
    Returns the library folder, for ``restructure(model, library=...)``.

    measure: decide per BatchNorm between our kernels and PyTorch by timing both on this
    machine (``tvm_rbn.build.measure``; `reps`, `margin` default to its REPS, MARGIN). The
    library then also holds the kernels its PyTorch layers' neighbours need, and its manifest
    the decisions with their measurements: "layers" {BatchNorm name: {"ours_ms",
    "torch_ms", "choice": "tvm"|"pytorch", ...}} and "layer_measurement" (how). The kernels
    are built through the on-disk cache, then copied to `out_dir`.
    """
    from ..tuning import records
    from .compile import build_cached, compile_library

    specs = [spec for spec, _ in extract(model, input_shape, dtype)]
    logs = Path(tuning_logs) if tuning_logs is not None else None
    if not measure:
        if out_dir is None:
            return build_cached(specs, logs)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        compile_library(specs, out, tuning_logs=logs if logs is not None and records.has_records(logs) else None)
        return out

    from . import measure as cost

    reps = cost.REPS if reps is None else reps
    margin = cost.MARGIN if margin is None else margin
    provider.add_library(build_cached(specs, logs))  # the kernels timed are the ones shipped
    layers = cost.measure(model, input_shape, dtype, reps=reps, margin=margin, progress=progress)
    slower = {name for name, row in layers.items() if row["choice"] == "pytorch"}
    if slower:  # their neighbours need kernels without these BatchNorms' prologues / epilogues
        specs = list(dict.fromkeys(specs + [s for s, _ in extract(model, input_shape, dtype, fallback=slower)]))
    entry = build_cached(specs, logs)
    with _library_lock(entry, out_dir):
        out = entry if out_dir is None else _copy_library(entry, Path(out_dir))
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["layers"] = layers
        manifest["layer_measurement"] = cost.conditions(input_shape, dtype, reps, margin)
        _replace(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return out


def _library_lock(entry: Path, out_dir):
    """A cache entry's manifest is rewritten under the entry's lock; a folder of one's own
    needs none."""
    import contextlib

    from . import cache

    return cache.locked(entry.with_name(entry.name + ".lock")) if out_dir is None else contextlib.nullcontext()


def _replace(path: Path, data: bytes) -> None:
    """Write by rename: a reader (or a process that loaded the old kernels.so) never sees a
    half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _copy_library(entry: Path, out: Path) -> Path:
    from ..runtime.library import LIBRARY_FILE, MANIFEST_FILE

    out.mkdir(parents=True, exist_ok=True)
    for name in (LIBRARY_FILE, MANIFEST_FILE):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(entry / name, tmp)
        os.replace(tmp, out / name)
    return out
