"""Forward convolution (``tvm_rbn.ops.conv2d_bn``): a register-tiled direct convolution on a
blocked layout, inside a kernel whose arguments stay NCHW / KCRS.

What the schedule builds, per kernel call:

1. **pack the input** (stage ``pad``, with ``act`` inlined into it): the activated, zero-padded
   input is written once into a kernel-local workspace in the blocked layout
   ``[n, c // ic_block, y, x, c % ic_block]``; the BatchNorm prologue runs here, once per
   element. Parallel over (n, channel block, row).
2. **pack the weights** (a ``cache_read`` of ``w``) into ``[k // oc_block, c // ic_block, r, s,
   c % ic_block, k % oc_block]``: a tap's weights for one input channel are one contiguous run
   of ``oc_block`` output channels, i.e. ``oc_block / lanes`` vectors.
3. **micro-kernel**: an output tile of ``ow_block`` columns x ``oc_block`` channels lives in
   ``ow_block * oc_block / lanes`` vector registers; for each input channel and tap it takes
   ``oc_block / lanes`` weight vectors and ``ow_block`` broadcast input scalars and does
   ``ow_block * oc_block / lanes`` FMAs. No vector runs along the output width, so small
   planes (7x7 and less) and strided convolutions vectorize as well as large ones.
4. **write back**: the tile is transposed into the NCHW output (vectorized along the tile's
   columns), right after its reduction.
5. **statistics epilogue** (``tile_sum``, ``tile_m2``): when a parallel task owns whole
   output planes (the default: task = (n, output-channel block)), the per-plane sums run in
   that task right after it wrote the planes, while they are in its cache, vectorized as
   ``lanes`` interleaved partial sums (``common.plane_reductions``); otherwise as separate
   parallel passes.

Knobs (``ConvKnobs``), all chosen by ``default_knobs`` from the shape, all tunable
(``knob_candidates`` lists valid alternatives): ``oc_block`` (output channels per tile, a
divisor of K, normally 16 or 32 = 1 or 2 vectors), ``ow_block`` (output columns per tile,
a divisor of Q), ``ic_block`` (input channels per packed block, a divisor of C: the inner
reduction loop's length), ``row_tasks`` (output-row blocks per (n, oc block) in the parallel
loop; 1 keeps the statistics in-task), ``unroll_taps`` (unroll the kernel-tap loops).
Every split is by a divisor, so no tile has a tail and any shape is correct.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from tvm.s_tir import Schedule

from tvm_rbn.build.target import vector_lanes

from . import common as cm

# vector registers the output tile may use (of 32 zmm/ymm with AVX-512; the rest hold the
# weight vectors and the broadcast input)
ACCUMULATOR_REGISTERS = 28
# fewer (n, oc block) tasks than this and output-row blocks join the parallel loop
MIN_TASKS = 16


@dataclass(frozen=True)
class ConvShape:
    """What the rules need from a conv PrimFunc (read off its ``conv`` block's loops)."""

    n: int
    k: int
    p: int
    q: int
    c: int
    r: int
    s: int
    lanes: int


@dataclass(frozen=True)
class ConvKnobs:
    oc_block: int
    ow_block: int
    ic_block: int
    row_tasks: int = 1
    unroll_taps: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def conv_shape(sch: Schedule, family: str, block_name: str = "conv") -> ConvShape:
    conv = cm.blocks(sch)[block_name]
    n, k, p, q, c, r, s = cm.extents(sch, sch.get_loops(conv))
    return ConvShape(n, k, p, q, c, r, s, vector_lanes(family, cm.dtype_of(sch, conv)))


def _oc_block(k: int, lanes: int) -> int:
    for ob in (2 * lanes, lanes):
        if k % ob == 0:
            return ob
    return cm.largest_divisor(k, 2 * lanes)


def _ow_block(q: int, vectors: int) -> int:
    return cm.largest_divisor(q, max(1, ACCUMULATOR_REGISTERS // vectors))


def _vectors(ob: int, lanes: int) -> int:
    return max(1, ob // cm.largest_divisor(ob, lanes))


def default_knobs(shape: ConvShape) -> ConvKnobs:
    """Rules: the widest output-channel tile of whole vectors (2, else 1), as many output
    columns as the accumulator registers allow (a divisor of Q), input channels in blocks of
    up to 64, and (n, oc block) tasks unless there are too few of them."""
    ob = _oc_block(shape.k, shape.lanes)
    ow = _ow_block(shape.q, _vectors(ob, shape.lanes))
    if ow * 2 < ACCUMULATOR_REGISTERS // _vectors(ob, shape.lanes) and ob > shape.lanes and shape.k % shape.lanes == 0:
        # a narrow tile (Q has no divisor near the register budget): try one vector of
        # channels and twice the columns
        ow1 = _ow_block(shape.q, 1)
        if ow1 > ow:
            ob, ow = shape.lanes, ow1
    ic = cm.largest_divisor(shape.c, 64)
    tasks = shape.n * (shape.k // ob)
    rows = 1
    if tasks < MIN_TASKS:
        rows = cm.largest_divisor(shape.p, -(-MIN_TASKS // tasks))
    return ConvKnobs(ob, ow, ic, rows, unroll_taps=False)


def knob_candidates(shape: ConvShape) -> list[ConvKnobs]:
    """Valid knob settings around the default, for a tuner to measure (default first)."""
    base = default_knobs(shape)
    obs = sorted({d for d in (shape.lanes, 2 * shape.lanes, 4 * shape.lanes) if shape.k % d == 0} | {base.oc_block})
    out = [base]
    for ob in obs:
        vec = _vectors(ob, shape.lanes)
        ows = sorted({d for d in range(1, shape.q + 1) if shape.q % d == 0 and d * vec <= ACCUMULATOR_REGISTERS})[-3:]
        ics = sorted({d for d in (8, 16, 32, 64, shape.c) if shape.c % d == 0})
        for ow, ic, unroll in itertools.product(ows, ics, (False, True)):
            kn = replace(base, oc_block=ob, ow_block=ow, ic_block=ic, unroll_taps=unroll)
            if kn not in out:
                out.append(kn)
    return out


def schedule_conv(sch: Schedule, family: str, knobs: ConvKnobs | None = None) -> Schedule:
    """Apply the blocked direct-convolution schedule to a forward conv PrimFunc's schedule."""
    shape = conv_shape(sch, family)
    kn = knobs or default_knobs(shape)
    B = cm.blocks(sch)
    conv = B["conv"]
    ob, ow, ib = kn.oc_block, kn.ow_block, kn.ic_block
    for what, size, block in (("oc_block", shape.k, ob), ("ow_block", shape.q, ow), ("ic_block", shape.c, ib)):
        if size % block:
            raise ValueError(f"{what}={block} does not divide {size}")
    vl = cm.largest_divisor(ob, shape.lanes)

    # weights -> [k//ob, c//ib, r, s, c%ib, k%ob]
    wpack = sch.cache_read(conv, cm.read_index(sch, conv, "w"), "global")
    sch.transform_layout(wpack, ("write", 0), lambda k, c, r, s: (k // ob, c // ib, r, s, c % ib, k % ob))
    # activated, padded input -> [n, c//ib, y, x, c%ib]
    pad = B["pad"]
    if "act" in B:
        sch.compute_inline(B["act"])
    sch.transform_layout(pad, ("write", 0), lambda n, c, y, x: (n, c // ib, y, x, c % ib))

    n, k, p, q, rc, rr, rs = sch.get_loops(conv)
    ko, ki = sch.split(k, [None, ob])
    qo, qi = sch.split(q, [None, ow])
    rco, rci = sch.split(rc, [None, ib])
    if kn.row_tasks > 1:
        po, pi = sch.split(p, [kn.row_tasks, None])
        sch.reorder(n, ko, po, pi, qo, rco, rr, rs, rci, qi, ki)
        task = sch.fuse(n, ko, po)
    else:
        sch.reorder(n, ko, p, qo, rco, rr, rs, rci, qi, ki)
        task = sch.fuse(n, ko)
    sch.parallel(task)
    # the register tile: a local [.., q, k%ob] buffer (channels innermost, one vector each)
    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n_, k_, p_, q_: (n_, k_ // ob, p_, q_, k_ % ob))
    sch.reverse_compute_at(acc, qo)
    if ow > 1:
        sch.vectorize(sch.get_loops(acc)[-1])
    kv, kl = sch.split(ki, [None, vl])
    if vl > 1:
        sch.vectorize(kl)
    sch.unroll(kv)
    sch.unroll(qi)
    if kn.unroll_taps:
        sch.unroll(rs)
    sch.decompose_reduction(conv, rco)

    # packing stages: once per call, parallel
    pn, pc, py, px = sch.get_loops(pad)
    pco, pci = sch.split(pc, [None, ib])
    sch.reorder(pn, pco, py, px, pci)
    sch.parallel(sch.fuse(pn, pco, py))
    sch.parallel(sch.get_loops(wpack)[0])

    if "tile_sum" in B:
        at = task if kn.row_tasks == 1 else None
        cm.plane_reductions(sch, [("tile_sum", B["tile_sum"]), ("tile_m2", B["tile_m2"])], shape.lanes, at)
    return sch


class ConvTemplate:
    """conv2d with optional prologue (act, pad) and statistics epilogue (see module doc)."""

    @staticmethod
    def apply(func, family: str, knobs: ConvKnobs | None = None):
        sch = Schedule(func)
        if "conv" not in cm.blocks(sch):
            return None
        return schedule_conv(sch, family, knobs)
