"""Specs -> scheduled PrimFuncs -> one runtime module -> exported library + manifest.

A kernel with a record in the tuning-log folder is built from its best tuned schedule; a
convolution kernel without one, from the best knob setting tuned for a kernel of its structure
class (``tuning.tasks.structure_class``) when that setting fits it; every other kernel from the
default template of its target family.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..kernels import KernelSpec
from . import cache
from .target import host_description, host_family, host_tvm_target


def lower_spec(spec: KernelSpec, family: str, database=None, target=None):
    """(scheduled PrimFunc named by the spec's symbol, how: "tuned" | "class" | None) for one
    kernel: its own best record, its structure class's best knobs, or the default template.

    A record is rebuilt from the knob setting it carries, with the templates of this version
    (so a template's improvement reaches every tuned kernel without retuning); a record
    without knobs, or whose knobs no longer fit, replays its trace."""
    from tvm_rbn.schedules import default_schedule, restore_untraced
    from tvm_rbn.schedules.x86.space import apply_knobs, knobs_of

    from tvm.s_tir import Schedule

    from ..tuning.records import records_for
    from ..tuning.tasks import is_tunable, tuning_twin, workload_mod

    func = spec.prim_func().with_attr("global_symbol", spec.symbol)
    if database is not None and is_tunable(spec):
        # a slice-reading or running-sum kernel's records are its twin's
        rec, class_setting = records_for(database, spec)
        if rec is not None:
            knobs = knobs_of(rec.trace)
            sch = apply_knobs(func, family, knobs) if knobs else None
            if sch is not None:
                return sch.mod["main"].with_attr("global_symbol", spec.symbol), "tuned"
            if tuning_twin(spec) is spec:  # a trace replays on the workload it was recorded for
                sch = Schedule(workload_mod(spec))
                rec.trace.apply_to_schedule(sch, remove_postproc=False)
                return restore_untraced(sch.mod["main"]).with_attr("global_symbol", spec.symbol), "tuned"
        if class_setting is not None:
            sch = apply_knobs(func, family, class_setting, fit=True)
            if sch is not None:
                return sch.mod["main"].with_attr("global_symbol", spec.symbol), "class"
    return default_schedule(func, family).mod["main"].with_attr("global_symbol", spec.symbol), None


def compile_library(specs: list[KernelSpec], out_dir: Path, family: str | None = None, target=None,
                    tuning_logs: Path | None = None) -> dict:
    """Build every spec into one module, export it to out_dir; returns the manifest.

    tuning_logs: a tuning-log folder for `family` (validated; a bad one raises TuningLogError).
    """
    import tvm

    from tvm_rbn.schedules import SCHEDULE_VERSION

    from ..tuning import records

    family = family or host_family()
    target = target or host_tvm_target()
    database = records.load(tuning_logs, family) if tuning_logs and records.has_records(tuning_logs) else None
    unique = {s.symbol: s for s in specs}
    start = time.perf_counter()
    lowered = {sym: lower_spec(spec, family, database, target) for sym, spec in sorted(unique.items())}
    lib = tvm.compile(tvm.IRModule({sym: func for sym, (func, _) in lowered.items()}), target=target)
    lib.export_library(str(out_dir / cache.LIBRARY_FILE))
    manifest = {
        "format": cache.FORMAT,
        "family": family,
        "target": str(target),
        "host": host_description(),
        "versions": cache.versions(),
        "schedules": SCHEDULE_VERSION,
        "tuning_logs": str(tuning_logs) if database is not None else None,
        "build_seconds": round(time.perf_counter() - start, 3),
        "kernels": [
            {"symbol": sym, "spec": json.loads(unique[sym].key), "tuned": how is not None, "schedule": how or "default"}
            for sym, (_, how) in lowered.items()
        ],
    }
    (out_dir / cache.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def build_cached(specs: list[KernelSpec], tuning_logs: Path | None = None) -> Path:
    """The cache entry holding a library with all `specs` for this host, built if missing.

    The key covers the specs, the host, the versions, the schedule templates and the content
    of the tuning-log folder, so new records give a new entry.
    """
    from tvm_rbn.schedules import SCHEDULE_VERSION

    from ..tuning import records

    family = host_family()
    logs = tuning_logs if tuning_logs is not None and records.has_records(tuning_logs) else None
    material = dict(host_description(), tuning=records.content_hash(logs) if logs else None)
    key = cache.entry_key([s.key for s in specs], material, SCHEDULE_VERSION)
    entry = cache.entry_dir(family, key)
    if cache.is_complete(entry):
        return entry
    with cache.locked(entry.with_name(entry.name + ".lock")):
        return cache.publish(entry, lambda tmp: compile_library(specs, tmp, family, tuning_logs=logs))
