"""Kernels on demand: loaded libraries first, then the disk cache, then a fresh build.

Building imports the TVM compiler (seconds); finding a kernel in a loaded or cached library
does not.
"""
from __future__ import annotations

import threading

from ..kernels import KernelSpec
from ..runtime.library import KernelLibrary

_lock = threading.RLock()
_libraries: list[KernelLibrary] = []
_functions: dict[str, object] = {}


def add_library(directory) -> KernelLibrary:
    """Make a library's kernels available to every later lookup."""
    lib = KernelLibrary(directory)
    with _lock:
        _libraries.insert(0, lib)
    return lib


def prepare(specs: list[KernelSpec]) -> None:
    """Build (or load from the cache) one library holding every missing spec."""
    from .compile import build_cached

    with _lock:
        missing = [s for s in specs if not _find(s.symbol)]
        if missing:
            add_library(build_cached(missing))


def kernel(spec: KernelSpec):
    """The callable kernel for `spec`; builds it on first use."""
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
