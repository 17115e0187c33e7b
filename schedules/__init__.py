"""Per-target schedule templates (installed as ``tvm_rbn.schedules``).

A template is a class whose ``apply(func, target_family)`` returns a scheduled
``tvm.s_tir.Schedule``, or None when the kernel is not of its kind (dlight's convention).
``default_schedule`` tries a family's templates in order; the last one always applies.
"""
from __future__ import annotations

# Bumped whenever a template changes what it generates: part of every cache key.
SCHEDULE_VERSION = "x86-default-20"


def templates_for(family: str) -> list:
    if family.startswith("x86") or family in ("aarch64", "arm64"):
        from .x86.default import DEFAULT_TEMPLATES

        return DEFAULT_TEMPLATES
    raise NotImplementedError(f"no schedule templates for target family {family!r}")


def default_schedule(func, family: str):
    """Schedule a kernel's PrimFunc with the first template of `family` that applies."""
    for template in templates_for(family):
        sch = template.apply(func, family)
        if sch is not None:
            return sch
    raise RuntimeError(f"no schedule template applies to this kernel on {family}")


def restore_untraced(func):
    """A scheduled PrimFunc with the template steps a trace does not record put back (the
    x86 border predicates, ``x86.common.apply_border_predicates``); the same func when they
    are there already or the kernel has none. For schedules replayed from traces: the
    tuner's search and its builder, a record without knobs."""
    from .x86.common import apply_border_predicates

    return apply_border_predicates(func)


def design_spaces(func, family: str, klass: str | None = None, limit: int | None = None,
                  batch: str | None = None) -> list:
    """A convolution kernel's knob settings as annotated schedules (default first), stamped
    with `batch` when given; [] for other kernels or families without knob templates."""
    if family.startswith("x86"):
        from .x86.space import design_spaces as x86_spaces

        return x86_spaces(func, family, klass, limit, batch)
    return []


def search_space(family: str, klass: str | None = None, measured=(), batch: str | None = None):
    """The MetaSchedule search space (space generator) of a convolution kernel for a family.

    x86: the designed templates' knob settings (``x86/space.py``), each design space
    annotated with its knobs and `klass`, the kernel's structure class, without the settings
    in `measured` (``knob_key`` strings) while others remain, stamped with `batch` (the
    tuning run's start: see ``tvm_rbn.tuning.records.measured_by_workload``). CUDA: the default GPU
    rules (tiling bound to blocks/threads, shared-memory staging, unrolling), with two
    changes: no cross-thread
    reduction, which cannot schedule our kernels (their conv output is both a result and the
    input of the statistics epilogue), and no virtual threads in the tiling.
    """
    if family.startswith("x86"):
        from .x86.space import schedule_fn

        return schedule_fn(family, klass, measured, batch)
    if family.startswith("cuda"):
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.schedule_rule import MultiLevelTiling, ReuseType

        # The default tiling binds its middle level to vthread.x and samples factors such as 14
        # from our odd spatial sizes, which VerifyGPUCode rejects (at most 8 virtual threads):
        # bind that level to threadIdx.y instead.
        tiling = MultiLevelTiling(
            structure="SSSRRSRS", tile_binds=["blockIdx.x", "threadIdx.y", "threadIdx.x"], max_innermost_factor=64,
            vector_load_lens=[1, 2, 3, 4, 8, 16],
            reuse_read=ReuseType(req="must", levels=[4], scope="shared"),
            reuse_write=ReuseType(req="must", levels=[3], scope="local"),
        )
        rules = []
        for rule in ms.ScheduleRule.create("cuda"):
            name = type(rule).__name__
            if name == "MultiLevelTiling":
                rules.append(tiling)
            elif name != "CrossThreadReduction":
                rules.append(rule)
        return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs="cuda", mutator_probs="cuda")
    raise NotImplementedError(f"no search space for target family {family!r}")


def cuda_target(arch: str):
    """The TVM target of an NVIDIA GPU, e.g. arch 'sm_90' (imports tvm)."""
    from tvm.target import Target

    return Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "max_threads_per_block": 1024,
                   "thread_warp_size": 32, "registers_per_block": 65536, "max_shared_memory_per_block": 49152,
                   "host": {"kind": "llvm"}})
