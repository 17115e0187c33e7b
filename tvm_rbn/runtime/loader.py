"""Load TVM's runtime library correctly, then exported modules.

Two traps this module exists for:
- a kernel with parallel loops segfaults when its library is loaded by ``tvm_ffi.load_module``
  alone: TVM's runtime (``tvm/lib/libtvm_runtime.so``, which provides the thread pool the
  kernels call into) must be loaded first with RTLD_GLOBAL;
- TVM's thread pool sizes itself once, on first use, to half the hardware concurrency (one
  thread on a 2-vCPU machine), unless ``TVM_NUM_THREADS`` is set. We set it to PyTorch's
  thread count before the pool exists, so both sides run on the same number of threads.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_runtime_loaded = False


def runtime_library_path() -> Path:
    """Path of libtvm_runtime.so in the installed apache-tvm wheel, found without importing tvm."""
    try:
        path = Path(importlib.metadata.distribution("apache-tvm").locate_file("tvm/lib/libtvm_runtime.so"))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("apache-tvm is not installed: its runtime library is needed to run kernels") from None
    if not path.exists():
        raise ImportError(f"TVM runtime library not found at {path}")
    return path


def _ensure_runtime() -> None:
    global _runtime_loaded
    with _lock:
        if _runtime_loaded:
            return
        if "TVM_NUM_THREADS" not in os.environ:
            import torch

            os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links against)

        ctypes.CDLL(str(runtime_library_path()), mode=ctypes.RTLD_GLOBAL)
        _runtime_loaded = True


def load_module(path: str | os.PathLike):
    """Load an exported kernel library; its functions take torch tensors directly (DLPack)."""
    _ensure_runtime()
    import tvm_ffi

    return tvm_ffi.load_module(str(path))


def num_threads() -> int:
    """Threads TVM's pool runs kernels with (fixed when the first kernel runs)."""
    _ensure_runtime()
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())
