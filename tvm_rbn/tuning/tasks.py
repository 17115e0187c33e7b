"""Tuning tasks: the kernels worth tuning and the IRModule MetaSchedule keys them by."""
from __future__ import annotations

from ..kernels import KernelSpec

# Kernels that hold the convolutions; the per-channel and elementwise ones stay on the
# default schedules (they are memory-bound and a few microseconds).
TUNABLE_OPS = ("conv2d_fused", "conv2d_dgrad", "conv2d_wgrad")


def is_tunable(spec: KernelSpec) -> bool:
    return spec.op in TUNABLE_OPS


def workload_mod(spec: KernelSpec):
    """The IRModule a kernel is tuned and looked up as (one function named 'main')."""
    import tvm

    func = spec.prim_func().with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func})


def flops(spec: KernelSpec) -> float:
    """Multiply-adds x 2 of a convolution kernel (its cost weight when dividing trials)."""
    p = spec.kwargs
    if spec.op not in TUNABLE_OPS:
        return 0.0
    sh, sw = p["stride"]
    ph, pw = p["padding"]
    out_h = (p["h"] + 2 * ph - p["r"]) // sh + 1
    out_w = (p["w"] + 2 * pw - p["s"]) // sw + 1
    return 2.0 * p["n"] * p["k"] * p["c"] * p["r"] * p["s"] * out_h * out_w


# spec parameters a kernel is tuned without: channel-slice views (MetaSchedule's runner
# allocates every argument dense) and the data gradient's running-sum output (one extra
# elementwise stage after the epilogue, placed by the template whatever the knobs)
TWIN_DROPS = ("views", "accumulate")


def structure_class(spec: KernelSpec) -> str:
    """Kernels one knob setting of a template fits, tuned once: the spec without its input
    channel count and what its tuning twin drops (e.g. DenseNet's 1x1 convolutions of one block)."""
    import json

    d = json.loads(spec.key)
    for varying in ("c", *TWIN_DROPS):
        d.pop(varying, None)
    return json.dumps(d, sort_keys=True)


def tuning_twin(spec: KernelSpec) -> KernelSpec:
    """The kernel as it is tuned and its records are kept and looked up: on whole tensors
    instead of channel slices of a block buffer, and without a running-sum output
    (``TWIN_DROPS``). Same structure class; a kernel is built with the knob setting measured
    on its twin."""
    if not any(k in spec.kwargs for k in TWIN_DROPS):
        return spec
    return KernelSpec.make(spec.op, **{k: v for k, v in spec.kwargs.items() if k not in TWIN_DROPS})
