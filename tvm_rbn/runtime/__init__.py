"""Loading and calling exported kernel libraries without the TVM compiler.

Only ``apache-tvm-ffi`` and TVM's runtime library are loaded here; ``import tvm`` (3 s, and
the compiler) is never needed to run kernels.
"""
from .loader import load_module, num_threads, runtime_library_path

__all__ = ["load_module", "num_threads", "runtime_library_path"]
