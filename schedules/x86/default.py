"""Default (untuned) x86 schedules: parallel over cores, vectorized, correct for any shape.

The convolution templates live in ``conv`` (forward) and ``backward`` (dgrad, wgrad).

These are the starting point that runs without tuning records; tuned search spaces replace
them per workload. Every split uses a divisor of the loop extent, so no template produces
predicated tails.
"""
from __future__ import annotations

from tvm.s_tir import Schedule
from tvm.tirx import IterVar

from tvm_rbn.build.target import vector_lanes

from .backward import BACKWARD_TEMPLATES
from .common import dtype_of as _dtype
from .common import plane_reductions
from .conv import ConvTemplate
from .pool import AvgPoolTemplate, MaxPoolTemplate
from .residual import ResidualBackwardTemplate


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _blocks(sch: Schedule) -> dict[str, object]:
    root = sch.get_sblock("root")
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(root)}


def _extents(sch: Schedule, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def _parallel_vectorize(sch: Schedule, block, lanes: int) -> None:
    """Spatial block: fuse and parallelize the outer loops, vectorize a divisor of the last."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = _extents(sch, [inner])[0]
    v = _largest_divisor(extent, lanes)
    if v > 1:
        outer_part, inner = sch.split(inner, [None, v])
        loops = list(loops[:-1]) + [outer_part]
        sch.vectorize(inner)
    else:
        loops = list(loops[:-1]) + [inner]
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    elif _extents(sch, loops)[0] > 1:
        sch.parallel(loops[0])


class PlaneStatsTemplate:
    """tile_sum / tile_m2 of a plain tensor."""

    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        blocks = _blocks(sch)
        if set(blocks) != {"tile_sum", "tile_m2"}:
            return None
        plane_reductions(sch, [(name, blocks[name]) for name in ("tile_sum", "tile_m2")],
                         vector_lanes(family, _dtype(sch, blocks["tile_sum"])))
        return sch


class ElementwiseTemplate:
    """Everything else: per-channel finalize math and the standalone apply kernel.

    Reductions stay serial (they are over a handful of tiles); spatial blocks are
    parallelized and vectorized when they are large enough to pay for it.
    """

    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        for name, block in _blocks(sch).items():
            if not _is_spatial(sch, block):
                continue
            loops = sch.get_loops(block)
            size = 1
            for e in _extents(sch, loops):
                size *= e
            if size >= 4096:
                dtype = str(sch.get(block).writes[0].source.dtype)
                _parallel_vectorize(sch, block, vector_lanes(family, dtype))
        return sch


def _is_spatial(sch: Schedule, block) -> bool:
    return all(iv.iter_type == IterVar.DataPar for iv in sch.get(block).iter_vars)


DEFAULT_TEMPLATES = [ConvTemplate, *BACKWARD_TEMPLATES, ResidualBackwardTemplate, MaxPoolTemplate, AvgPoolTemplate,
                     PlaneStatsTemplate, ElementwiseTemplate]
