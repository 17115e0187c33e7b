"""Default x86 schedule of the residual-branch backward (``tvm_rbn.ops.residual``).

One task per (n, c) plane, parallel over planes: the task writes the plane's gradients
(``grad_y`` and ``grad_y2`` / ``grad_identity``, vectorized along the row) and then reduces
the same plane, still in its cache, into the BatchNorm partials (``tile_dbeta``,
``tile_dgamma``[, ``tile_dgamma2``]) as `lanes` interleaved vector partial sums added in a fixed
order: one pass over the inputs, deterministic, no atomics. The mask stage ``dz`` is formed
once per element into a plane-sized buffer (allocated per task: TVM places an allocation at
the innermost loop that holds all its uses and compacts it to the region used there). The
max pool backward's padded (dpool, tap) planes are formed per task too, before ``dz``.
Splits are by divisors, so any shape is correct.

The forward (``act``) is a plain elementwise kernel and takes the elementwise default.
"""
from __future__ import annotations

from tvm.s_tir import Schedule
from tvm.tirx import IterVar

from tvm_rbn.build.target import vector_lanes


def _divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _blocks(sch: Schedule) -> dict:
    root = sch.get_sblock("root")
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(root)}


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _vectorize_row(sch: Schedule, block, lanes: int) -> None:
    inner = sch.get_loops(block)[-1]
    v = _divisor(_extent(sch, inner), lanes)
    if v > 1:
        sch.vectorize(sch.split(inner, [None, v])[1])


def _plane_sum_at(sch: Schedule, block, plane, lanes: int) -> None:
    """A per-plane reduction [n, c, rh, rw] under the plane loop, as `lane` interleaved partials."""
    _, _, rh, rw = sch.get_loops(block)
    size = _extent(sch, rh) * _extent(sch, rw)
    if size == 1:  # 1x1 planes: nothing to split
        sch.reverse_compute_at(block, plane, preserve_unit_loops=True)
        return
    lane = _divisor(size, lanes)
    _, li = sch.split(sch.fuse(rh, rw), [None, lane])
    rf = sch.rfactor(li, factor_axis=2)
    # rfactor puts the lane variable first among its spatial iterators: move it after the
    # reduction so that, under the plane loop, the lanes are the inner (vector) loop
    sblock = sch.get(rf)
    region = sblock.writes[0].region
    order = []
    for dim in (0, 1):
        var = region[dim].min
        order += [i for i, iv in enumerate(sblock.iter_vars) if iv.var.same_as(var)]
    order += [i for i, iv in enumerate(sblock.iter_vars) if iv.iter_type != IterVar.DataPar]
    lane_var = region[2].min
    order += [i for i, iv in enumerate(sblock.iter_vars) if iv.var.same_as(lane_var)]
    sch.reorder_block_iter_var(rf, order)
    sch.reverse_compute_at(rf, plane, preserve_unit_loops=True)
    sch.reverse_compute_at(block, plane, preserve_unit_loops=True)
    loops = sch.get_loops(rf)
    if lane > 1:
        sch.vectorize(loops[-1])
    sch.decompose_reduction(rf, loops[-2])


class ResidualBackwardTemplate:
    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        blocks = _blocks(sch)
        if "grad_y" not in blocks:
            return None
        dz = blocks["dz"]
        lanes = vector_lanes(family, str(sch.get(dz).writes[0].source.dtype))
        n, c, _, _ = sch.get_loops(dz)
        plane = sch.fuse(n, c)
        sch.parallel(plane)
        for name in ("dpool_pad", "tap_pad"):  # the max pool backward's padded (dpool, tap) planes
            if name in blocks:
                sch.compute_at(blocks[name], plane, preserve_unit_loops=True)
        _vectorize_row(sch, dz, lanes)
        for name in ("grad_y", "grad_y2", "grad_identity"):
            if name in blocks:
                sch.reverse_compute_at(blocks[name], plane, preserve_unit_loops=True)
                _vectorize_row(sch, blocks[name], lanes)
        for name in ("tile_dbeta", "tile_dgamma", "tile_dgamma2"):
            if name in blocks:
                _plane_sum_at(sch, blocks[name], plane, lanes)
        return sch
