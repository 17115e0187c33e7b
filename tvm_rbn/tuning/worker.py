"""Functions MetaSchedule's builder workers call by name.

The stock builder imports ``tvm.s_tir.tensor_intrin`` (about 25 s here) in every worker of
every batch; our kernels use no tensor intrinsics, so this build skips it.
"""
from __future__ import annotations

BUILD_FUNC = "tvm_rbn.tuning.build"


def register() -> None:
    """Worker initializer: register the build function in this process."""
    import tvm_ffi

    if tvm_ffi.get_global_func(BUILD_FUNC, allow_missing=True) is None:
        tvm_ffi.register_global_func(BUILD_FUNC, _build)


def _build(mod, target, _params):
    from tvm import IRModule
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from tvm_rbn.schedules import restore_untraced

    # the search replays design spaces from their traces, which lack the border predicates
    mod = IRModule({"main": restore_untraced(mod["main"])})
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
