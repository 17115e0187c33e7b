"""Default (untuned) x86 schedules of the backward kernels (``tvm_rbn.ops.conv2d_bn_backward``,
``tvm_rbn.ops.bn_backward``): parallel over cores, vectorized, correct for any shape.

As in ``default``, every split is by a divisor of the loop extent, and every reduction runs in
a fixed order inside one task: no atomics, so results do not depend on the thread count.

The templates are listed in ``default.DEFAULT_TEMPLATES``; this module imports the shared
helpers from ``default`` when a template runs, not at import time, so either module can be
imported first.
"""
from __future__ import annotations

from tvm.s_tir import Schedule
from tvm.tirx import IterVar

from tvm_rbn.build.target import vector_lanes


# Input rows per dgrad task: the gradient rows they read (R-1 more than the task's rows, per
# stride phase) are formed once per task, so more rows per task recompute the overlap less.
ROWS_PER_TASK = 4


def _helpers():
    from . import default

    return default


def _dtype(sch: Schedule, block) -> str:
    return str(sch.get(block).writes[0].source.dtype)


def _is_identity(sch: Schedule, block) -> bool:
    """A padding stage that pads nothing (same shape as what it reads)."""
    out = list(sch.get(block).writes[0].source.shape)
    return all(list(r.source.shape) == out for r in sch.get(block).reads if len(r.source.shape) == len(out))


def _schedule_spatial_root(sch: Schedule, block, lanes: int) -> None:
    """A stage computed once over its whole extent: parallel outer loops, vectorized inner."""
    _helpers()._parallel_vectorize(sch, block, lanes)


def _vectorize_inner(sch: Schedule, block, lanes: int) -> None:
    """Vectorize a divisor of a block's innermost loop."""
    h = _helpers()
    inner = sch.get_loops(block)[-1]
    v = h._largest_divisor(h._extents(sch, [inner])[0], lanes)
    if v > 1:
        sch.vectorize(sch.split(inner, [None, v])[1])


def _iter_order(sch: Schedule, block, order: list) -> None:
    """Reorder a block's iteration variables: ("write", i) names the variable indexing
    dimension i of what the block writes; None stands for its reduction variables (in their
    order). The loops that compute_at / reverse_compute_at create follow this order."""
    sblock = sch.get(block)
    region = sblock.writes[0].region
    positions = []
    for item in order:
        if item is None:
            positions += [i for i, iv in enumerate(sblock.iter_vars) if iv.iter_type != IterVar.DataPar]
        else:
            var = region[item[1]].min
            (pos,) = [i for i, iv in enumerate(sblock.iter_vars) if iv.var.same_as(var)]
            positions.append(pos)
    sch.reorder_block_iter_var(block, positions)


def _row_partials(sch: Schedule, block, row, lanes: int) -> None:
    """Per-plane sum over (h, w), taken row by row while the row is in cache.

    The reduction over w is split into vector lanes and rfactor'd over (h, lane): the task of
    input row h adds its row into `lanes` partials of its own (vectorized, no atomics), and a
    final plane-parallel pass adds each plane's H*lanes partials in a fixed order.
    """
    h = _helpers()
    n, c, rh, rw = sch.get_loops(block)
    ext_w = h._extents(sch, [rw])[0]
    lane = h._largest_divisor(ext_w, lanes)
    rwo, rwi = sch.split(rw, [None, lane])
    sch.reorder(n, c, rwo, rh, rwi)
    rf = sch.rfactor(sch.fuse(rh, rwi), factor_axis=2)
    _iter_order(sch, rf, [("write", 0), ("write", 1), None, ("write", 2)])
    sch.reverse_compute_at(rf, row, preserve_unit_loops=True)
    loops = sch.get_loops(rf)
    below = [i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(row))][0] + 1
    reductions, hv = loops[below + 1:-1], loops[-1]  # below the row: c, reduction loops, hv
    # the task's rows x lanes: one row's lanes per vector
    hvo, hvi = sch.split(hv, [None, lane])
    sch.reorder(hvo, *reductions, hvi)
    if lane > 1:
        sch.vectorize(hvi)
    sch.decompose_reduction(rf, reductions[0])
    n, c = sch.get_loops(block)[:2]
    sch.parallel(sch.fuse(n, c))


class DgradTemplate:
    """Data-gradient convolution with optional grad prologue and BatchNorm epilogue.

    Tile: one input row (n, h) of `ci` channels x `ui` columns of one stride phase, `ui`
    vectorized, reduced over (k, taps) with the tile in registers. Parallel over (n, h) rows. The gradient rows a row
    needs (grad prologue applied, zero-bordered) are formed once per row task. The epilogue's
    ReLU mask is applied while the tile is in registers and dz is written once; the row's
    contributions to the per-plane partials are added up by the same task while the row is
    still in cache (``_row_partials``).
    """

    @staticmethod
    def apply(func, family: str):
        h = _helpers()
        sch = Schedule(func)
        blocks = h._blocks(sch)
        if "dgrad" not in blocks:
            return None
        dgrad = blocks["dgrad"]
        lanes = vector_lanes(family, _dtype(sch, dgrad))
        epilogue = "dz" in blocks

        n, c, y, t, u, rk, ri, rj = sch.get_loops(dgrad)
        ext_c, ext_y, ext_u = h._extents(sch, [c, y, u])
        co, ci = sch.split(c, [None, h._largest_divisor(ext_c, 8)])
        yo, yi = sch.split(y, [None, h._largest_divisor(ext_y, ROWS_PER_TASK)])
        uo, ui = sch.split(u, [None, h._largest_divisor(ext_u, lanes)])
        sch.reorder(n, yo, yi, co, t, uo, rk, ri, rj, ci, ui)
        row = sch.fuse(n, yo)
        sch.parallel(row)
        # da never leaves the task: the tile of `ci` channels x one row is accumulated in a
        # local buffer (one vector of a phase's columns at a time, in registers), then written
        # out in NCHW, through the dz epilogue when there is one.
        sch.set_scope(dgrad, 0, "local")
        if epilogue:
            sch.compute_inline(blocks["da"])
            out = blocks["dz"]
        else:
            out = blocks["da"]
        sch.reverse_compute_at(out, co)
        _vectorize_inner(sch, out, lanes)
        sch.vectorize(ui)
        sch.unroll(ci)
        sch.decompose_reduction(dgrad, rk)

        if "weight_pad" in blocks:
            _schedule_spatial_root(sch, blocks["weight_pad"], lanes)
        gpad = blocks["grad_pad"]
        if _is_identity(sch, gpad):
            sch.compute_inline(gpad)
            if "grad" in blocks:
                sch.compute_at(blocks["grad"], row)
                _vectorize_inner(sch, blocks["grad"], lanes)
        else:
            sch.compute_at(gpad, row)
            if "grad" in blocks:
                # the prologue over the task's gradient rows, vectorized, before the zero border
                # is added around them
                sch.compute_at(blocks["grad"], row)
                _vectorize_inner(sch, blocks["grad"], lanes)
        if epilogue:
            for name in ("tile_dbeta", "tile_dgamma"):
                _row_partials(sch, blocks[name], row, lanes)
        return sch


class WgradTemplate:
    """Weight-gradient convolution with optional grad prologue and activation prologue.

    A GEMM over the long (n, p, q) reduction into the small dw. Each task owns a block of dw,
    `kb` output x `cb*lanes` input channels at all taps, accumulated in a local tile laid out
    (k, r, s, c) so input channels are the vector lanes; parallel over those blocks, and each
    output is reduced in a fixed order (n, p, q) inside its task: deterministic, no atomics.
    Per gradient row (n, p) and tap (r, s) the tile's vectors stay in registers over q,
    fed by a scalar of the gradient times a vector of the activation.

    The activation is formed once, in parallel, into a kernel-local workspace with channels
    innermost (prologue relu(x*scale + shift) and the zero padding applied while writing it),
    and the grad prologue c1*dz + c2*x + c3, when present, likewise: every element is used
    C*R*S/(cb*lanes) (K*R*S/kb) times, too often to recompute per use.
    """

    @staticmethod
    def apply(func, family: str):
        h = _helpers()
        sch = Schedule(func)
        blocks = h._blocks(sch)
        if "wgrad" not in blocks:
            return None
        wgrad = blocks["wgrad"]
        lanes = vector_lanes(family, _dtype(sch, wgrad))

        k, c, r, s, rn, rp, rq = sch.get_loops(wgrad)
        ext_k, ext_c = h._extents(sch, [k, c])
        ci_ext = h._largest_divisor(ext_c, lanes)
        ko, ki = sch.split(k, [None, h._largest_divisor(ext_k, 8)])
        co, cb, ci = sch.split(c, [None, h._largest_divisor(ext_c // ci_ext, 2), ci_ext])
        sch.reorder(ko, co, rn, rp, r, s, rq, ki, cb, ci)
        task = sch.fuse(ko, co)
        sch.parallel(task)
        acc = sch.cache_write(wgrad, 0, "local")
        sch.transform_layout(wgrad, ("write", 0), lambda k_, c_, r_, s_: (k_, r_, s_, c_))
        sch.reverse_compute_at(acc, task)
        sch.vectorize(ci)
        sch.unroll(cb)
        sch.unroll(ki)
        sch.decompose_reduction(wgrad, rn)

        pad = blocks["pad"]
        if "act" in blocks:
            sch.compute_inline(blocks["act"])
        sch.transform_layout(pad, ("write", 0), lambda n_, c_, y_, x_: (n_, y_, x_, c_))
        pn, pc, py, px = sch.get_loops(pad)
        sch.reorder(pn, py, px, pc)
        sch.parallel(sch.fuse(pn, py))
        if "grad" in blocks:
            _schedule_spatial_root(sch, blocks["grad"], lanes)
        return sch


class GradStatsTemplate:
    """The standalone BatchNorm(+ReLU) backward: parallel over (n, h) rows; each task writes
    its row of dz (vectorized) and adds it into its own row partials, as in ``DgradTemplate``."""

    @staticmethod
    def apply(func, family: str):
        h = _helpers()
        sch = Schedule(func)
        blocks = h._blocks(sch)
        if set(blocks) != {"dz", "tile_dbeta", "tile_dgamma"}:
            return None
        dz = blocks["dz"]
        lanes = vector_lanes(family, _dtype(sch, dz))
        n, c, y, x = sch.get_loops(dz)
        xo, xi = sch.split(x, [None, h._largest_divisor(h._extents(sch, [x])[0], lanes)])
        sch.reorder(n, y, c, xo, xi)
        row = sch.fuse(n, y)
        sch.parallel(row)
        sch.vectorize(xi)
        for name in ("tile_dbeta", "tile_dgamma"):
            _row_partials(sch, blocks[name], row, lanes)
        return sch


BACKWARD_TEMPLATES = [DgradTemplate, WgradTemplate, GradStatsTemplate]
