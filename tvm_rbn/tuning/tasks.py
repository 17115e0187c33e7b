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


def structure_class(spec: KernelSpec) -> str:
    """Kernels one knob setting of a template fits, tuned once: the spec without its input
    channel count and channel-slice views (e.g. DenseNet's 1x1 convolutions of one block)."""
    import json

    d = json.loads(spec.key)
    for varying in ("c", "views"):
        d.pop(varying, None)
    return json.dumps(d, sort_keys=True)


def without_views(spec: KernelSpec) -> KernelSpec:
    """The kernel on whole tensors instead of channel slices of a block buffer: measurable by
    MetaSchedule's runner (which allocates each argument as a dense tensor) and of the same
    structure class. Records are kept and looked up under it: a slice-reading kernel is built
    with the knob setting measured on its whole-tensor twin."""
    if "views" not in spec.kwargs:
        return spec
    return KernelSpec.make(spec.op, **{k: v for k, v in spec.kwargs.items() if k != "views"})
