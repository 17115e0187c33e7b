"""Per-target schedule templates (installed as ``tvm_rbn.schedules``).

A template is a class whose ``apply(func, target_family)`` returns a scheduled
``tvm.s_tir.Schedule``, or None when the kernel is not of its kind (dlight's convention).
``default_schedule`` tries a family's templates in order; the last one always applies.
"""
from __future__ import annotations

# Bumped whenever a template changes what it generates: part of every cache key.
SCHEDULE_VERSION = "x86-default-5"


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


def search_space(family: str):
    """The MetaSchedule search space (space generator) for a target family.

    x86 and CUDA: MetaSchedule's post-order-apply over its default schedule rules for the
    target (multi-level tiling, inlining, parallelize/vectorize/unroll, and for CUDA thread
    binding and shared-memory staging): a sound space for every kernel; designed per-kernel
    templates can replace it per block through the ``schedule_rule`` annotation.
    """
    if family.startswith("x86") or family.startswith("cuda"):
        return "post-order-apply"
    raise NotImplementedError(f"no search space for target family {family!r}")
