"""Specs -> scheduled PrimFuncs -> one runtime module -> exported library + manifest."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..kernels import KernelSpec
from . import cache
from .target import host_description, host_family, host_tvm_target


def lower_spec(spec: KernelSpec, family: str):
    """The scheduled PrimFunc of one kernel, named by the spec's symbol."""
    from tvm import te

    from tvm_rbn.schedules import default_schedule

    func = te.create_prim_func(spec.build_args()).with_attr("global_symbol", spec.symbol)
    return default_schedule(func, family).mod["main"].with_attr("global_symbol", spec.symbol)


def compile_library(specs: list[KernelSpec], out_dir: Path, family: str | None = None, target=None) -> dict:
    """Build every spec into one module, export it to out_dir; returns the manifest."""
    import tvm

    from tvm_rbn.schedules import SCHEDULE_VERSION

    family = family or host_family()
    target = target or host_tvm_target()
    unique = {s.symbol: s for s in specs}
    start = time.perf_counter()
    mod = tvm.IRModule({sym: lower_spec(spec, family) for sym, spec in sorted(unique.items())})
    lib = tvm.compile(mod, target=target)
    lib.export_library(str(out_dir / cache.LIBRARY_FILE))
    manifest = {
        "format": cache.FORMAT,
        "family": family,
        "target": str(target),
        "host": host_description(),
        "versions": cache.versions(),
        "schedules": SCHEDULE_VERSION,
        "build_seconds": round(time.perf_counter() - start, 3),
        "kernels": [
            {"symbol": sym, "spec": json.loads(spec.key), "tuned": False} for sym, spec in sorted(unique.items())
        ],
    }
    (out_dir / cache.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def build_cached(specs: list[KernelSpec]) -> Path:
    """The cache entry holding a library with all `specs` for this host, built if missing."""
    from tvm_rbn.schedules import SCHEDULE_VERSION

    family = host_family()
    key = cache.entry_key([s.key for s in specs], host_description(), SCHEDULE_VERSION)
    entry = cache.entry_dir(family, key)
    if cache.is_complete(entry):
        return entry
    with cache.locked(entry.with_name(entry.name + ".lock")):
        return cache.publish(entry, lambda tmp: compile_library(specs, tmp, family))
