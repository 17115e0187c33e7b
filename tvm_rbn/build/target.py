"""Target detection: the hardware family (keys tuning logs and caches) and the TVM target.

The family is read from /proc/cpuinfo without importing TVM, so the runtime can find cached
libraries; the TVM target (with LLVM's name for the host CPU) is made only when compiling.
"""
from __future__ import annotations

import functools
import os
import platform


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def host_family() -> str:
    """'x86-avx512', 'x86-avx2', 'x86-64' or the machine name, e.g. 'aarch64'."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return machine.lower()
    flags = set(_cpuinfo().get("flags", "").split())
    if "avx512f" in flags:
        return "x86-avx512"
    if "avx2" in flags and "fma" in flags:
        return "x86-avx2"
    return "x86-64"


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def host_description() -> dict:
    """What a library built for this host depends on: cache key material."""
    return {"family": host_family(), "cpu": cpu_name()}


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def vector_lanes(family: str, dtype: str) -> int:
    bits = {"x86-avx512": 512, "x86-avx2": 256}.get(family, 128)
    return bits // (64 if dtype == "float64" else 32)


def vector_registers(family: str) -> int:
    """Architectural vector registers: 32 zmm with AVX-512, 16 ymm/xmm otherwise."""
    return 32 if family == "x86-avx512" else 16


def host_tvm_target():
    """The TVM target for this CPU (imports tvm)."""
    import tvm
    from tvm.target import codegen

    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": host_cores()}
    )


# LLVM CPUs that stand for a family when tuning or building for it on another x86 host
# (an AVX-512 machine measures AVX2 code faithfully: the same cores, narrower vectors).
FAMILY_CPUS = {"x86-avx2": "haswell", "x86-avx512": "skylake-avx512"}


def family_tvm_target(family: str):
    """The TVM target for `family`: the host's own CPU when it is of that family."""
    import tvm

    if family == host_family():
        return host_tvm_target()
    if family not in FAMILY_CPUS:
        raise ValueError(f"no CPU target for family {family!r}; known: {sorted(FAMILY_CPUS)}")
    return tvm.target.Target({"kind": "llvm", "mcpu": FAMILY_CPUS[family], "num-cores": host_cores()})
