"""Kernels on demand: loaded libraries first, then the disk cache, then a fresh build.

Building imports the TVM compiler (seconds); finding a kernel in a loaded or cached library
does not.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter
from pathlib import Path

from ..kernels import KernelSpec
from ..runtime.library import KernelLibrary

_lock = threading.RLock()
_libraries: list[KernelLibrary] = []
_functions: dict[str, object] = {}
_recorders: list[tuple[Counter, dict | None]] = []
_dry_run = threading.local()
_built_untuned: list[KernelSpec] = []
_tuned_symbols: set[str] = set()
_owner: contextvars.ContextVar = contextvars.ContextVar("tvm_rbn_kernel_owner", default=None)
_tuning_logs: list = [None]  # the folder to build tuned kernels from; None: the committed one


def set_tuning_logs(path) -> None:
    """Use this tuning-log folder (for the host's family) for kernels built from now on."""
    _tuning_logs[0] = Path(path) if path is not None else None


def tuning_logs() -> Path:
    from ..tuning import records
    from .target import host_family

    return _tuning_logs[0] if _tuning_logs[0] is not None else records.folder(host_family())


@contextlib.contextmanager
def owner(kernels: set | None):
    """Record the symbols of the kernels requested inside the block into `kernels`."""
    token = _owner.set(kernels)
    try:
        yield
    finally:
        _owner.reset(token)


def current_owner() -> set | None:
    return _owner.get()


def is_tuned(symbol: str) -> bool:
    return symbol in _tuned_symbols


@contextlib.contextmanager
def record(dry_run: bool = False, by_owner: dict | None = None):
    """Count the kernels requested inside the block; with dry_run, kernels are not built or
    run (outputs stay uninitialized): a cheap way to list the workloads of a model.

    by_owner: a dict that also gets the counts per owner (see `owner`), as
    {id(owner set): Counter of specs}; kernels requested outside any owner are not in it.
    """
    counts: Counter = Counter()
    entry = (counts, by_owner)
    _recorders.append(entry)
    previous = getattr(_dry_run, "on", False)
    _dry_run.on = previous or dry_run
    try:
        yield counts
    finally:
        _dry_run.on = previous
        del _recorders[next(i for i, e in enumerate(_recorders) if e is entry)]


def _skip(*_args) -> None:
    return None


def take_built_untuned() -> list[KernelSpec]:
    """Specs built with untuned default schedules since the last call."""
    with _lock:
        out = list(_built_untuned)
        _built_untuned.clear()
        return out


def add_library(directory) -> KernelLibrary:
    """Make a library's kernels available to every later lookup."""
    lib = KernelLibrary(directory)
    with _lock:
        _libraries.insert(0, lib)
        _tuned_symbols.update(k["symbol"] for k in lib.manifest["kernels"] if k.get("tuned"))
    return lib


def prepare(specs: list[KernelSpec]) -> None:
    """Build (or load from the cache) one library holding every missing spec."""
    with _lock:
        missing = list({s.symbol: s for s in specs if not _find(s.symbol)}.values())
        if not missing:
            return
        try:
            from .compile import build_cached

            lib = add_library(build_cached(missing, tuning_logs()))
        except ImportError as exc:
            names = ", ".join(s.key for s in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise RuntimeError(
                f"{len(missing)} kernel(s) are in no loaded library and the TVM compiler is unavailable "
                f"({exc}); build a library for this model and input shape first. Missing: {names}"
            ) from exc
        tuned = {k["symbol"] for k in lib.manifest["kernels"] if k.get("tuned")}
        _built_untuned.extend(s for s in missing if s.symbol not in tuned)


def kernel(spec: KernelSpec):
    """The callable kernel for `spec`; builds it on first use."""
    kernels = _owner.get()
    for counts, by_owner in _recorders:
        counts[spec] += 1
        if by_owner is not None and kernels is not None:
            by_owner.setdefault(id(kernels), Counter())[spec] += 1
    if kernels is not None:
        kernels.add(spec.symbol)
    if getattr(_dry_run, "on", False):
        return _skip
    fn = _functions.get(spec.symbol)
    if fn is not None:
        return fn
    with _lock:
        fn = _find(spec.symbol)
        if fn is None:
            prepare([spec])
            fn = _find(spec.symbol)
        _functions[spec.symbol] = fn
        return fn


def _find(symbol: str):
    for lib in _libraries:
        if symbol in lib:
            return lib.function(symbol)
    return None
