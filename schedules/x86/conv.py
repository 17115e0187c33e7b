"""Forward convolution (``tvm_rbn.ops.conv2d_bn``): a register-tiled direct convolution on a
blocked layout, inside a kernel whose arguments stay NCHW / KCRS.

What the schedule builds, per kernel call:

1. **pack the input** (stage ``pad``, with ``act`` inlined into it): the activated, zero-padded
   input is written into a workspace in the blocked layout ``[n, c // ic_block, y, x,
   c % ic_block]``; the BatchNorm prologue runs here, once per element. With per-image tasks
   (the default when there are enough images for the cores) each task packs its own image
   into a task-local workspace that stays in cache while every output-channel block is
   computed from it; otherwise the whole input is packed up front, in parallel. An input
   with neither prologue nor padding (a 1x1 conv reading a materialized tensor) is not
   packed: the micro-kernel broadcasts from the NCHW argument itself, where a tile's columns
   are one contiguous run per channel (``direct_input``; resnet50's 14x14 1x1 1024->256:
   5.8 -> 3.5 ms, the packing transposition was most of the difference).
2. **pack the weights** (a ``cache_read`` of ``w``) into ``[k // oc_block, c // ic_block, r, s,
   c % ic_block, k % oc_block]``: a tap's weights for one input channel are one contiguous run
   of ``oc_block`` output channels, i.e. ``oc_block / lanes`` vectors.
3. **micro-kernel**: an output tile of ``ow_block`` columns x ``oc_block`` channels lives in
   ``ow_block * oc_block / lanes`` vector registers; for each input channel and tap it takes
   ``oc_block / lanes`` weight vectors and ``ow_block`` broadcast input scalars and does
   ``ow_block * oc_block / lanes`` FMAs. No vector runs along the output width, so small
   planes (7x7 and less) and strided convolutions vectorize as well as large ones.
   The other orientation, vectors along the flattened output plane with broadcast weights
   (NCHW on both sides, no transposition), was measured on Zen 4 (AVX-512) for the 56x56 1x1
   64 -> 256 forward kernel with prologue and statistics, where the write-back transposition
   weighs most: 2 output channels x 7 zmm of 112 positions took 15.2 and 13.2 ms against
   15.9 and 12.5 ms for this template's tuned setting (two runs, 41 alternating reps), even
   within the noise; 4 channels x 7 ymm columns spilled accumulators (21.7 against 11.0 ms).
4. **write back**: the tile is transposed into the NCHW output (vectorized along the tile's
   columns), right after its reduction.
5. **statistics epilogue** (``tile_sum``, ``tile_m2``): when a task owns whole output planes
   (per-image tasks, or (n, oc block) tasks without a row split), the per-plane sums of an
   output-channel block run right after its planes were written, while they are in cache,
   vectorized as ``lanes`` interleaved partial sums (``common.plane_reductions``); otherwise
   as separate parallel passes.

Knobs (``ConvKnobs``), chosen by ``default_knobs`` from the shape, all tunable
(``knob_candidates`` lists valid alternatives, default first):

- ``oc_block``: output channels per tile, a divisor of K; 2 vectors (32 fp32) when K allows.
- ``ow_block``: output columns per tile, a divisor of Q; ``oc_block/lanes * ow_block`` at most
  the family's accumulator registers (``accumulator_registers``: 28 with AVX-512, 12 with AVX2).
- ``ic_block``: input channels per packed block, a divisor of C (default up to 8: the pack is
  a transposition, cheap for a few channels; the micro-kernel broadcasts either way).
- ``per_image``: tasks are images (input packed in-task) or (image, oc block) pairs.
- ``row_tasks``: output-row blocks per task in the parallel loop (for small batches);
  > 1 moves the statistics to separate passes.
- ``unroll_taps``: unroll the kernel-width tap loop.
- ``direct_input``: read an input without prologue or padding in place instead of packing
  it (the default whenever it can; False in records older than the knob, which packed).
- ``skip_border``: taps that read the zero padding do no work (``common.skip_border_taps``);
  a 3x3 pad-1 layer on a 7x7 plane spends 2 of 9 rows and columns on zeros. By default for
  stride-1 layers on small planes with many input channels, where it measured faster
  (``common.skips_border_by_default``); False in older records.

Every split is by a divisor, so no tile has a tail and any shape is correct.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from tvm.s_tir import Schedule

from tvm_rbn.build.target import host_cores, vector_lanes, vector_registers

from . import common as cm

# vector registers the output tile may not use: they hold the weight vectors and the
# broadcast input. A tile larger than the rest spills accumulators to the stack on every FMA:
# measured on Zen 3 with AVX2 (16 ymm), 28x28 3x3 128->128 at batch 16, 16 lanes x 7 columns
# (14 accumulators) 56 ms, 16 x 4 (8) 22 ms, oneDNN 21-28 ms.
RESERVED_REGISTERS = 4


def accumulator_registers(family: str) -> int:
    """Vector registers an output tile may use: 28 of AVX-512's 32, 12 of AVX2's 16."""
    return vector_registers(family) - RESERVED_REGISTERS


# fewer (n, oc block) tasks than this and output-row blocks join the parallel loop
MIN_TASKS = 16
# per-image tasks when there are at least this many images per core
MIN_IMAGES_PER_CORE = 2
# input channels per packed block: the packing is a transposition (NCHW -> [c//ib, y, x, ib]),
# cheap for a few channels (8 read streams), costlier for more; the micro-kernel runs its
# innermost reduction loop over the block, faster when long (fewer loop exits). So: long
# blocks when each packed element feeds many FMAs (K*R*S/stride^2 >= PACK_INTENSITY), short
# ones otherwise (measured on AVX-512: 1x1 256->64 at 56x56 wants 8, 3x3 64->64 wants 64).
IC_BLOCK_SHORT, IC_BLOCK_LONG, PACK_INTENSITY = 8, 64, 512


def ic_block_cap(uses_per_element: int) -> int:
    return IC_BLOCK_LONG if uses_per_element >= PACK_INTENSITY else IC_BLOCK_SHORT


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
    stride_area: int = 1
    bare_input: bool = False  # no prologue, no padding: the input can be read in place
    border: bool = False  # the padded input has a zero border
    accumulators: int = 28  # vector registers the output tile may use (accumulator_registers)


@dataclass(frozen=True)
class ConvKnobs:
    oc_block: int
    ow_block: int
    ic_block: int
    per_image: bool = True
    row_tasks: int = 1
    unroll_taps: bool = False
    ic_chunks: int = 1
    unroll_ic: bool = False
    batch_inner: int = 0
    direct_input: bool = False
    skip_border: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def fit_conv_knobs(kn: ConvKnobs, c: int) -> ConvKnobs:
    """A class member's setting for C input channels: ``ic_block`` and ``ic_chunks`` at most as
    large as tuned, divisors of C and of its blocks."""
    ib = cm.largest_divisor(c, kn.ic_block)
    return replace(kn, ic_block=ib, ic_chunks=cm.largest_divisor(c // ib, kn.ic_chunks))


def conv_shape(sch: Schedule, family: str, block_name: str = "conv") -> ConvShape:
    conv = cm.blocks(sch)[block_name]
    n, k, p, q, c, r, s = cm.extents(sch, sch.get_loops(conv))
    # the stride, from the input rows each output row advances (read index p*sh + r)
    pad_rows = int(sch.get(cm.blocks(sch)["pad"]).writes[0].source.shape[2])
    pad_cols = int(sch.get(cm.blocks(sch)["pad"]).writes[0].source.shape[3])
    sh = (pad_rows - r) // (p - 1) if p > 1 else 1
    sw = (pad_cols - s) // (q - 1) if q > 1 else 1
    return ConvShape(n, k, p, q, c, r, s, vector_lanes(family, cm.dtype_of(sch, conv)), max(1, sh) * max(1, sw),
                     can_read_directly(sch), cm.zero_border(sch, cm.blocks(sch)["pad"]) is not None,
                     accumulator_registers(family))


def _oc_block(k: int, lanes: int) -> int:
    for ob in (2 * lanes, lanes):
        if k % ob == 0:
            return ob
    return cm.largest_divisor(k, 2 * lanes)


def _ow_block(q: int, vectors: int, accumulators: int) -> int:
    return cm.largest_divisor(q, max(1, accumulators // vectors))


def tile_channels(channels: int, columns: int, lanes: int, accumulators: int) -> tuple[int, int]:
    """(channels, columns) of a register tile whose channels are the vector lanes: the widest
    tile of whole vectors (2, else 1) and as many columns (a divisor of `columns`) as the
    `accumulators` registers allow; one vector and more columns when `columns` has no divisor
    near the budget for two."""
    ob = _oc_block(channels, lanes)
    vectors = cm.vector_count(ob, lanes)
    ow = _ow_block(columns, vectors, accumulators)
    if ow * 2 < accumulators // vectors and ob > lanes and channels % lanes == 0:
        ow1 = _ow_block(columns, 1, accumulators)
        if ow1 > ow:
            ob, ow = lanes, ow1
    return ob, ow


def default_knobs(shape: ConvShape, cores: int | None = None) -> ConvKnobs:
    """Rules: the widest output-channel tile of whole vectors (2, else 1), as many output
    columns as the accumulator registers allow (a divisor of Q), input channels in blocks of
    up to IC_BLOCK; per-image tasks (input packed in-task, in cache) when there are enough
    images for the cores, else (n, oc block) tasks, split by output rows if still too few."""
    ob, ow = tile_channels(shape.k, shape.q, shape.lanes, shape.accumulators)
    ic = cm.largest_divisor(shape.c, ic_block_cap(shape.k * shape.r * shape.s // shape.stride_area))
    cores = cores or host_cores()
    direct = shape.bare_input
    skip = cm.skips_border_by_default(shape.border, shape.stride_area == 1, shape.q, shape.c)
    if shape.n >= MIN_IMAGES_PER_CORE * cores:
        return ConvKnobs(ob, ow, ic, per_image=True, direct_input=direct, skip_border=skip)
    tasks = shape.n * (shape.k // ob)
    rows = 1
    if tasks < MIN_TASKS:
        rows = cm.largest_divisor(shape.p, -(-MIN_TASKS // tasks))
    return ConvKnobs(ob, ow, ic, per_image=False, row_tasks=rows, direct_input=direct, skip_border=skip)


def knob_candidates(shape: ConvShape) -> list[ConvKnobs]:
    """Valid knob settings around the default, for a tuner to measure (default first)."""
    base = default_knobs(shape)
    obs = sorted({d for d in (shape.lanes, 2 * shape.lanes, 4 * shape.lanes) if shape.k % d == 0} | {base.oc_block})
    out = [base]
    for ob in obs:
        vec = cm.vector_count(ob, shape.lanes)
        ows = sorted({d for d in range(1, shape.q + 1) if shape.q % d == 0 and d * vec <= shape.accumulators})[-3:]
        ics = sorted({d for d in (1, 2, 4, 8, 16, shape.c) if shape.c % d == 0} | {base.ic_block})
        directs = (True, False) if shape.bare_input else (False,)
        for ow, ic, per_image, unroll, direct in itertools.product(ows, ics, (True, False), (False, True), directs):
            kn = replace(base, oc_block=ob, ow_block=ow, ic_block=ic, per_image=per_image, unroll_taps=unroll,
                         direct_input=direct)
            if kn not in out:
                out.append(kn)
    return cm.with_border_choice(out, shape.border)


def can_read_directly(sch: Schedule) -> bool:
    """The input needs no prologue and no padding: the micro-kernel can broadcast it from the
    NCHW argument (one row of a plane is contiguous) instead of a packed copy."""
    B = cm.blocks(sch)
    return "act" not in B and cm.is_identity_pad(sch, B["pad"])


def schedule_conv(sch: Schedule, family: str, knobs: ConvKnobs | None = None) -> Schedule:
    """Apply the blocked direct-convolution schedule to a forward conv PrimFunc's schedule."""
    shape = conv_shape(sch, family)
    kn = knobs or default_knobs(shape)
    B = cm.blocks(sch)
    conv = B["conv"]
    ob, ow, ib = kn.oc_block, kn.ow_block, kn.ic_block
    for what, size, block in (("oc_block", shape.k, ob), ("ow_block", shape.q, ow), ("ic_block", shape.c, ib),
                              ("row_tasks", shape.p, kn.row_tasks), ("ic_chunks", shape.c // ib, kn.ic_chunks)):
        if size % block:
            raise ValueError(f"{what}={block} does not divide {size}")
    vl = cm.largest_divisor(ob, shape.lanes)

    # weights -> [k//ob, c//ib, r, s, c%ib, k%ob]
    wpack = sch.cache_read(conv, cm.read_index(sch, conv, "w"), "global")
    sch.transform_layout(wpack, ("write", 0), lambda k, c, r, s: (k // ob, c // ib, r, s, c % ib, k % ob))
    # activated, padded input -> [n, c//ib, y, x, c%ib]
    pad = B["pad"]
    direct = kn.direct_input
    if direct:
        if not shape.bare_input:
            raise ValueError("direct_input: the input needs a prologue or padding")
        sch.compute_inline(pad)
    else:
        if "act" in B:
            sch.compute_inline(B["act"])
        sch.transform_layout(pad, ("write", 0), lambda n, c, y, x: (n, c // ib, y, x, c % ib))

    n, k, p, q, rc, rr, rs = sch.get_loops(conv)
    ko, ki = sch.split(k, [None, ob])
    qo, qi = sch.split(q, [None, ow])
    rco, rci = sch.split(rc, [None, ib])
    if kn.batch_inner:
        # weight reuse across images: tasks are (oc block, image group); every image of the
        # group is computed with the block's weights while they are in cache
        no, n = sch.split(n, [None, kn.batch_inner])
        outer = [ko, no, n]
    elif kn.row_tasks > 1:
        po, p = sch.split(p, [kn.row_tasks, None])
        outer = [n, po, ko] if kn.per_image else [n, ko, po]
    else:
        outer = [n, ko] if kn.per_image else [n, ko]
    if kn.ic_chunks > 1:
        # input-channel chunks outside the spatial loops: a chunk's weights stay in cache for
        # every tile of the plane; the tiles accumulate in a plane-sized local buffer
        rcc, rco = sch.split(rco, [kn.ic_chunks, None])
        sch.reorder(*outer, rcc, p, qo, rco, rr, rs, rci, qi, ki)
    else:
        rcc = None
        sch.reorder(*outer, p, qo, rco, rr, rs, rci, qi, ki)
    if kn.batch_inner:
        task = sch.fuse(ko, no)
        planes = n
    elif kn.per_image:
        # task: one image (or row block of one), its input packed inside the task, every
        # output-channel block computed from that packed copy while it is in cache
        task = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
        planes = ko
    else:
        # task: (image, output-channel block) [, row block]; the input is packed up front
        task = sch.fuse(*outer)
        planes = task
    sch.parallel(task)
    # the register tile: a local [.., q, k%ob] buffer (channels innermost, one vector each)
    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n_, k_, p_, q_: (n_, k_ // ob, p_, q_, k_ % ob))
    if rcc is None:
        sch.reverse_compute_at(acc, qo)
        if ow > 1:
            sch.vectorize(sch.get_loops(acc)[-1])
    else:
        sch.reverse_compute_at(acc, planes if kn.row_tasks == 1 or not kn.per_image else ko)
        cm.vectorize_inner(sch, acc, shape.lanes)
    kv, kl = sch.split(ki, [None, vl])
    if vl > 1:
        sch.vectorize(kl)
    sch.unroll(kv)
    sch.unroll(qi)
    if kn.unroll_taps:
        sch.unroll(rs)
    if kn.unroll_ic:
        sch.unroll(rci)
    sch.decompose_reduction(conv, rcc if rcc is not None else rco)
    if kn.skip_border and not direct:
        cm.skip_border_taps(sch, conv, pad, qo, rs)

    # input packing: per task (into a task-local workspace) or once per call, in parallel
    if not direct:
        cm.pack_channel_blocks(sch, pad, ib, task if kn.per_image and not kn.batch_inner else None)
    cm.pack_weights(sch, wpack, ob, ib, "k")

    if "tile_sum" in B:
        at = planes if kn.row_tasks == 1 else None
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
