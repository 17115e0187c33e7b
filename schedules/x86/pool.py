"""Default x86 schedules of the BatchNorm(+ReLU) max and average pools (``tvm_rbn.ops.pool``).

Max pool forward: one task per (n, c) plane (parallel): the task applies the BatchNorm(+ReLU)
to its plane into a padded buffer (vectorized rows, in cache), then reduces each window in
row-major order (the first maximum wins, as in PyTorch), unrolled, for a vector of output
columns at a time. Average pool forward (non-overlapping windows: each input read once): the
same tasks with the apply inlined into the window sum. The backwards have the residual
backward's stages and take its template (``residual.ResidualBackwardTemplate``).
"""
from __future__ import annotations

from tvm.s_tir import Schedule

from tvm_rbn.build.target import vector_lanes

from . import common as cm


def _schedule_windows(sch: Schedule, pool, family: str, staged=None) -> Schedule:
    """One task per (n, c) plane (parallel); per output row, a vector of output columns at a
    time reduces its windows, unrolled. `staged`: a stage formed per plane first, in cache."""
    lanes = vector_lanes(family, cm.dtype_of(sch, pool))
    n, c, p, q, ri, rj = sch.get_loops(pool)
    plane = sch.fuse(n, c)
    sch.parallel(plane)
    if staged is not None:
        sch.compute_at(staged, plane, preserve_unit_loops=True)
        cm.vectorize_inner(sch, staged, lanes)
    qo, qi = sch.split(q, [None, cm.largest_divisor(int(sch.get(q).extent), lanes)])
    sch.reorder(p, qo, ri, rj, qi)
    vector = int(sch.get(qi).extent) > 1
    if vector:
        sch.vectorize(qi)
    init = sch.decompose_reduction(pool, ri)
    sch.unroll(ri)
    sch.unroll(rj)
    if vector:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch


class MaxPoolTemplate:
    """The forward max pool (stage ``pool``, the applied plane ``act_pad`` staged per task);
    None for other kernels."""

    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        blocks = cm.blocks(sch)
        if "pool" not in blocks:
            return None
        return _schedule_windows(sch, blocks["pool"], family, staged=blocks["act_pad"])


class AvgPoolTemplate:
    """The forward average pool (stage ``avg_pool``, the apply inlined: non-overlapping windows
    read each input once); None for other kernels."""

    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        blocks = cm.blocks(sch)
        if "avg_pool" not in blocks:
            return None
        return _schedule_windows(sch, blocks["avg_pool"], family)
