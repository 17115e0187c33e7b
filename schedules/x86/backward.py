"""Default (untuned) x86 schedules of the backward kernels (``tvm_rbn.ops.conv2d_bn_backward``,
``tvm_rbn.ops.bn_backward``): parallel over cores, vectorized, correct for any shape.

As in ``conv`` (the forward template, whose design the data gradient mirrors), every split is
by a divisor of the loop extent, and every reduction runs in a fixed order inside one task: no
atomics, so results do not depend on the thread count. Templates are listed in
``default.DEFAULT_TEMPLATES``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from tvm import DataType
from tvm.s_tir import Schedule
from tvm.tirx import IterVar

from tvm_rbn.build.target import host_cores, vector_lanes

from . import common as cm


# output channels per block of the packed gradient (dgrad's innermost reduction loop): long
# when every packed element feeds many FMAs (C*R*S >= PACK_INTENSITY), short otherwise (the
# packing transposition is cheaper); as conv.ic_block_cap, measured on AVX-512
K_BLOCK_SHORT, K_BLOCK_LONG, PACK_INTENSITY = 8, 64, 256
# a 1x1 data gradient over planes up to this size keeps its gradient unblocked (k_block 1):
# the prologue pass is then elementwise and a tile's columns are one contiguous run per
# channel; measured on AVX-512, resnet50's 14x14 1x1 256<-1024: 6.8 -> 4.0 ms, 7x7 512<-2048:
# 5.8 -> 4.0 ms (at 28x28 and for 3x3 taps the blocked packing stays faster)
SMALL_PLANE = 14 * 14
# a weight gradient's default task takes all of K when one image's packed gradient for it fits
# in this many bytes (half a Zen 4 core's L2): each c tile re-reads it. densenet121's 14x14 and
# 28x28 1x1 layers (100 and 400 KB) gained 10-50%; at 56x56 (1.6 MB) the smaller block buffers
# lost up to 1.37x against k tasks of 32 channels (56x56 1x1 64->128: 8.8 -> 12.1 ms)
GRAD_IMAGE_BYTES = 512 * 1024


def _dtype(sch: Schedule, block) -> str:
    return cm.dtype_of(sch, block)


def _schedule_spatial_root(sch: Schedule, block, lanes: int) -> None:
    """A stage computed once over its whole extent: parallel outer loops, vectorized inner."""
    cm.parallel_vectorize(sch, block, lanes)


_vectorize_inner = cm.vectorize_inner
_iter_order = cm.iter_order


def _row_partials(sch: Schedule, block, row, lanes: int) -> None:
    """Per-plane sum over (h, w), taken row by row while the row is in cache.

    The reduction over w is split into vector lanes and rfactor'd over (h, lane): the task of
    input row h adds its row into `lanes` partials of its own (vectorized, no atomics), and a
    final plane-parallel pass adds each plane's H*lanes partials in a fixed order.
    """
    n, c, rh, rw = sch.get_loops(block)
    ext_w = cm.extents(sch, [rw])[0]
    lane = cm.largest_divisor(ext_w, lanes)
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


@dataclass(frozen=True)
class DgradKnobs:
    """Knobs of the data-gradient template (see ``DgradTemplate``).

    ic_block: input channels (the dgrad's output channels) per register tile, a divisor of C:
        the vector axis, 2 vectors when C allows.
    ow_block: columns of one stride phase per tile, a divisor of ceil(W / stride).
    k_block: output channels per block of the packed gradient, a divisor of K (the innermost
        reduction loop; small keeps the packing transposition cheap; 1 keeps the gradient
        NCHW, no transposition at all).
    per_image: tasks are images (gradient packed in-task, in cache) or (image, ic block) pairs.
    row_tasks: input-row blocks per task in the parallel loop (small batches); > 1 moves the
        BatchNorm partials to separate passes.
    skip_border: taps that read the gradient's zero border do no work, as in the forward
        template (``conv.ConvKnobs.skip_border``).
    """

    ic_block: int
    ow_block: int
    k_block: int
    per_image: bool = True
    row_tasks: int = 1
    skip_border: bool = False


@dataclass(frozen=True)
class DgradShape:
    n: int
    c: int
    h: int
    u: int  # columns per stride phase, ceil(W / sw)
    k: int
    lanes: int
    taps: int  # R*S of the forward conv
    row_stride: int
    col_stride: int
    accumulators: int = 28  # vector registers the register tile may use (conv.accumulator_registers)
    border: bool = False  # the padded gradient has a zero border


def _phase_blocks(sch: Schedule) -> list:
    """The data gradient's reduction stages: ``dgrad``, or ``dgrad_{a}_{b}`` per stride phase."""
    named = cm.blocks(sch)
    return [named[name] for name in sorted(named) if name == "dgrad" or name.startswith("dgrad_")]


def _phase_stride(sch: Schedule, dim: int) -> int:
    """sh (dim 2) or sw (dim 3), from the ``da`` stage's index into a phase stage (h // sh)."""
    from tvm.tirx import FloorDiv

    for region in sch.get(cm.blocks(sch)["da"]).reads:
        index = region.region[dim].min
        if isinstance(index, FloorDiv):
            return int(index.b)
    return 1


def dgrad_shape(sch: Schedule, family: str) -> DgradShape:
    from .conv import accumulator_registers

    phases = _phase_blocks(sch)
    da = cm.blocks(sch)["da"]
    n, c, h, _ = (int(d) for d in sch.get(da).writes[0].source.shape)
    taps = 0
    for block in phases:
        _, _, _, u, k, ri, rj = cm.extents(sch, sch.get_loops(block))
        taps += ri * rj
    return DgradShape(n, c, h, u, k, vector_lanes(family, cm.dtype_of(sch, phases[0])), taps,
                      _phase_stride(sch, 2), _phase_stride(sch, 3), accumulator_registers(family),
                      cm.zero_border(sch, cm.blocks(sch)["grad_pad"]) is not None)


def default_dgrad_knobs(shape: DgradShape, cores: int | None = None) -> DgradKnobs:
    """The forward template's rules with C in the role of K (see ``conv.default_knobs``)."""
    from .conv import MIN_IMAGES_PER_CORE, MIN_TASKS, tile_channels

    cb, ub = tile_channels(shape.c, shape.u, shape.lanes, shape.accumulators)
    if shape.taps == 1 and shape.h * shape.u <= SMALL_PLANE:
        kb = 1  # the gradient stays NCHW: its packing is an elementwise pass, not a transposition
    else:
        kb = cm.largest_divisor(shape.k, K_BLOCK_LONG if shape.c * shape.taps >= PACK_INTENSITY else K_BLOCK_SHORT)
    cores = cores or host_cores()
    skip = cm.skips_border_by_default(shape.border, (shape.row_stride, shape.col_stride) == (1, 1), shape.u, shape.k)
    if shape.n >= MIN_IMAGES_PER_CORE * cores:
        return DgradKnobs(cb, ub, kb, per_image=True, skip_border=skip)
    tasks = shape.n * (shape.c // cb)
    rows_u = -(-shape.h // shape.row_stride)
    rows = 1 if tasks >= MIN_TASKS else cm.largest_divisor(rows_u, -(-MIN_TASKS // tasks))
    return DgradKnobs(cb, ub, kb, per_image=False, row_tasks=rows, skip_border=skip)


def fit_dgrad_knobs(kn: DgradKnobs, c: int) -> DgradKnobs:
    """A class member's setting for C input channels (the data gradient's outputs): ``ic_block``
    the largest divisor of C at most as large as tuned."""
    return replace(kn, ic_block=cm.largest_divisor(c, kn.ic_block))


def dgrad_knob_candidates(shape: DgradShape) -> list[DgradKnobs]:
    """Valid knob settings around the default, for a tuner to measure (default first)."""
    base = default_dgrad_knobs(shape)
    out = [base]
    for cb in sorted({d for d in (shape.lanes, 2 * shape.lanes) if shape.c % d == 0} | {base.ic_block}):
        vec = cm.vector_count(cb, shape.lanes)
        ubs = sorted(d for d in range(1, shape.u + 1) if shape.u % d == 0 and d * vec <= shape.accumulators)[-3:]
        kbs = sorted({d for d in (1, 8, 16, 32, 64) if shape.k % d == 0} | {base.k_block})
        for ub, kb, per_image in itertools.product(ubs, kbs, (True, False)):
            kn = replace(base, ic_block=cb, ow_block=ub, k_block=kb, per_image=per_image)
            if kn not in out:
                out.append(kn)
    return cm.with_border_choice(out, shape.border)


def schedule_dgrad(sch: Schedule, family: str, knobs: DgradKnobs | None = None) -> Schedule:
    shape = dgrad_shape(sch, family)
    kn = knobs or default_dgrad_knobs(shape)
    B = cm.blocks(sch)
    phases = _phase_blocks(sch)
    cb, ub, kb = kn.ic_block, kn.ow_block, kn.k_block
    rows_u = -(-shape.h // shape.row_stride)
    for what, size, block in (("ic_block", shape.c, cb), ("ow_block", shape.u, ub), ("k_block", shape.k, kb),
                              ("row_tasks", rows_u, kn.row_tasks)):
        if size % block:
            raise ValueError(f"{what}={block} does not divide {size}")
    lanes = shape.lanes
    vl = cm.largest_divisor(cb, lanes)
    epilogue = "dz" in B

    # gradient (grad prologue applied, zero border) -> [n, k//kb, y, x, k%kb]
    gpad = B["grad_pad"]
    if "grad" in B:
        sch.compute_inline(B["grad"])
    sch.transform_layout(gpad, ("write", 0), lambda n, k, y, x: (n, k // kb, y, x, k % kb))
    # weights, one packed copy for every phase -> [c//cb, k//kb, r, s, k%kb, c%cb]
    wpack = sch.cache_read(phases[0], cm.read_index(sch, phases[0], "w"), "global", consumer_blocks=phases)
    sch.transform_layout(wpack, ("write", 0), lambda k, c, r, s: (c // cb, k // kb, r, s, k % kb, c % cb))

    # the output, NCHW, through the BatchNorm epilogue when there is one: it drives the loops
    if epilogue:
        sch.compute_inline(B["da"])
        out = B["dz"]
    else:
        out = B["da"]
    n, c, h, w = sch.get_loops(out)
    co, ci = sch.split(c, [None, cb])
    uneven = shape.h % shape.row_stride != 0
    if shape.row_stride > 1:
        # the phase rows u are computed once, for the sh input rows that read them (a
        # predicated tail when H is not a multiple of sh)
        uh, ah = sch.split(h, [None, shape.row_stride])
        below = [ah, ci, w]
    else:
        uh, below = h, [ci, w]
    if kn.row_tasks > 1:
        uho, uh = sch.split(uh, [kn.row_tasks, None])
        outer = [n, uho, co] if kn.per_image else [n, co, uho]
    else:
        outer = [n, co]
    sch.reorder(*outer, uh, *below)
    if kn.per_image:
        task = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
        planes = co
    else:
        task = sch.fuse(*outer)
        planes = task
    sch.parallel(task)
    sw = shape.col_stride
    if sw > 1 and cm.extents(sch, [below[-1]])[0] % sw == 0:
        # columns by phase: for each b, w = sw*v + b reads phase column v of one phase (its
        # selection folds to a constant once b is unrolled), instead of a select per column
        v, b = sch.split(below[-1], [None, sw])
        sch.reorder(b, v)
        sch.unroll(b)
        if shape.row_stride > 1:
            sch.unroll(below[0])
    _vectorize_inner(sch, out, lanes)

    # per phase: one phase row of the tile's channels, channels innermost, in a local buffer,
    # computed right before the input rows that read it; register tile: ow_block columns x
    # ic_block channels, reduced over K and the phase's taps
    for block in phases:
        sch.compute_at(block, uh, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")
        sch.transform_layout(block, ("write", 0), lambda n_, c_, u_, v_: (n_, c_ // cb, u_, v_, c_ % cb))
        bc, bu, bv, rk, ri, rj = cm.loops_under(sch, block, uh)[-6:]
        vo, vi = sch.split(bv, [None, ub])
        rko, rki = sch.split(rk, [None, kb])
        sch.reorder(bu, vo, rko, ri, rj, rki, vi, bc)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, vo)
        cv, cl = sch.split(bc, [None, vl])
        if vl > 1:
            sch.vectorize(cl)
            sch.vectorize(sch.get_loops(acc)[-1])
        sch.unroll(cv)
        sch.unroll(vi)
        sch.decompose_reduction(block, rko)
        if kn.skip_border:
            cm.skip_border_taps(sch, block, gpad, vo, rj)

    # gradient packing: per task (image) or once per call
    cm.pack_channel_blocks(sch, gpad, kb, task if kn.per_image else None)
    cm.pack_weights(sch, wpack, kb, cb, "c")
    # in-task consumers of the epilogue need the task's planes written without a predicated
    # tail (TVM derives wrong loop extents for a consumer placed after one)
    at = planes if kn.row_tasks == 1 and not uneven else None
    if epilogue:
        cm.plane_reductions(sch, [(name, B[name]) for name in ("tile_dbeta", "tile_dgamma")], lanes, at)
    if "acc" in B:
        # the running sum, plane by plane right after the task wrote dz's planes: dz is then a
        # task-local buffer (its allocation compacts to what one task writes) that never goes
        # to memory, and each channel plane of the sum is one sequential stream
        if at is None:
            _schedule_spatial_root(sch, B["acc"], lanes)
        else:
            sch.reverse_compute_at(B["acc"], at, preserve_unit_loops=True)
            sch.fuse(*sch.get_loops(B["acc"])[-2:])
            _vectorize_inner(sch, B["acc"], lanes)
    return sch


class DgradTemplate:
    """Data-gradient convolution with optional grad prologue and BatchNorm epilogue.

    The forward template's design (``conv``) with C and K swapped, per stride phase:

    - the gradient, with the grad prologue c1*dz + c2*x + c3 applied and the zero border the
      phase-wise taps read (stage ``grad_pad``), is packed to ``[n, k // k_block, y, x,
      k % k_block]``: per image inside an image task (in cache), or up front;
    - the weights (``weight_pad``: zero taps up to whole taps per phase, or a ``cache_read``
      of ``w``) to ``[c // ic_block, k // k_block, r, s, k % k_block, c % ic_block]``;
    - register tile: ``ow_block`` columns of one phase x ``ic_block`` input channels (vectors),
      reduced over K and the phase's taps with broadcast gradient scalars;
    - the tile goes into a row buffer (channels innermost); per input row, the row is written
      out in NCHW, through the epilogue dz = da*[x_raw*scale + shift > 0] when there is one;
      with stride phases, column by column of one phase at a time (each output column reads
      one phase's buffer, not a select over all of them: 1.5x on resnet50's 56x56 3x3 stride-2
      data gradient);
    - the epilogue's per-plane partials (``tile_dbeta``, ``tile_dgamma``) of a channel block
      are summed in-task right after its planes were written (vectorized partial sums).

    Knobs: ``DgradKnobs``; defaults by ``default_dgrad_knobs``, alternatives by
    ``dgrad_knob_candidates``. Deterministic: every sum in a fixed order inside one task.
    """

    @staticmethod
    def apply(func, family: str, knobs: DgradKnobs | None = None):
        sch = Schedule(func)
        if not _phase_blocks(sch):
            return None
        return schedule_dgrad(sch, family, knobs)


@dataclass(frozen=True)
class WgradKnobs:
    """Knobs of the weight-gradient template (see ``WgradTemplate``).

    vector_axis: "k" (output channels are the vector lanes; the gradient is packed k-innermost
        and the activation broadcast) or "c" (input channels are the lanes; the activation is
        packed c-innermost and the gradient broadcast).
    k_block: output channels per tile (for "k": lanes x vectors; for "c": broadcast rows).
    c_block: input channels per tile (for "k": broadcast columns, times the S taps; for "c":
        lanes x vectors).
    c_task: input channels per parallel task (a multiple of c_block dividing C); the tasks
        are (k_block, c_task) blocks of dw, each reduced over (n, p, q) in a fixed order.
    image_major: the reduction runs image by image, each c tile over all the image's rows
        (the broadcast operand's channel planes are read as a few sequential streams, the
        vector operand's packed image stays in cache); else row by row, all c tiles per row.
    k_tiles: k_block tiles per task. A task's k tiles run one after another on each row of
        the vector operand while it is in L1, so that operand is read K / (k_tiles * k_block)
        times instead of K / k_block times (resnet50's 56x56 3x3 stride-2 layer, 8 tiles of
        8: 17.2 -> 11.1 ms; some layers lose, so it is tuned).
    plane: the register tile accumulates over a whole output plane (rows and columns as one
        loop) before it is added to the task's dw block, instead of over one row: on small
        planes a row is a short run (7 or 14 FMAs per accumulator between loading and storing
        the tile). The order is then image-major whatever image_major says, and a task's k
        tiles take turns per plane instead of per row (strided layers with several k tiles
        lose: resnet50's 14x14 3x3 stride-2 512, 19.4 -> 28.6 ms), so it is tuned.
    tile_prologue: the activation operand (input prologue, zero padding) is formed per (image,
        c tile) inside the task, just before the tile's reduction reads it from cache, instead
        of once per call into a whole NCHW (or packed) copy that is written to memory and read
        back by every k task. With output channels as lanes it applies only where there is
        something to form (``WgradShape.formed``; elsewhere the input itself is read and the
        knob changes nothing); with input channels as lanes the packed copy is formed.
        On densenet121's 1x1 block-buffer layers, with all of K in one task (``k_tiles``) so
        the input is read once: 14x14 992->128 9.9 -> 4.6 ms (oneDNN channels-last 4.6 ms),
        28x28 256->128 5.9 -> 5.2 ms. A task per k block forms it again: with input channels as
        lanes and k blocks of 8, resnet50's 14x14 1x1 256->1024 went 8.0 -> 16.7 ms; on 3x3
        layers it wins or loses by plane size. So it is tuned.
    """

    vector_axis: str
    k_block: int
    c_block: int
    c_task: int
    image_major: bool = True  # reduction order (n, c tile, p, q), else (n, p, c tile, q)
    k_tiles: int = 1
    plane: bool = False
    tile_prologue: bool = False


@dataclass(frozen=True)
class WgradShape:
    k: int
    c: int
    r: int
    s: int
    n: int
    p: int
    q: int
    h_pad: int
    w_pad: int
    lanes: int
    accumulators: int = 28  # vector registers the register tile may use (conv.accumulator_registers)
    formed: bool = True  # the activation operand is a stage of its own (prologue or padding)
    itemsize: int = 4

    @property
    def stride(self) -> tuple[int, int]:
        """Read off the padded input extent the output rows/columns advance over."""
        sh = (self.h_pad - self.r) // (self.p - 1) if self.p > 1 else 1
        sw = (self.w_pad - self.s) // (self.q - 1) if self.q > 1 else 1
        return max(1, sh), max(1, sw)


def wgrad_shape(sch: Schedule, family: str) -> WgradShape:
    from .conv import accumulator_registers

    B = cm.blocks(sch)
    wgrad = B["wgrad"]
    k, c, r, s, n, p, q = cm.extents(sch, sch.get_loops(wgrad))
    hp, wp = (int(d) for d in sch.get(B["pad"]).writes[0].source.shape[2:])
    formed = "act" in B or not cm.is_identity_pad(sch, B["pad"])
    dtype = cm.dtype_of(sch, wgrad)
    return WgradShape(k, c, r, s, n, p, q, hp, wp, vector_lanes(family, dtype), accumulator_registers(family), formed,
                      DataType(dtype).bits // 8)


def default_wgrad_knobs(shape: WgradShape, cores: int | None = None) -> WgradKnobs:
    """Vector lanes over output channels when the input channels do not fill vectors (the
    3-channel stem), for strided layers and for 1x1 layers that reduce channels; over input
    channels otherwise. Tiles within the accumulator registers (~24 of 28 with AVX-512, ~8 of 12
    with AVX2); tasks over (k block, c block) of dw, enough for the
    cores, with as few c blocks as possible (each re-reads the gradient)."""
    acc = shape.accumulators
    lanes = shape.lanes
    cores = cores or host_cores()
    if shape.c % lanes and not shape.k % lanes:
        axis = "k"
    elif shape.k % lanes and not shape.c % lanes:
        axis = "c"
    else:
        # measured (AVX-512, fp32): "c" wins for stride-1 layers, except 1x1 layers that
        # reduce channels (C > K: the gradient is the smaller tensor); "k" for strided ones
        # (their activation is the larger tensor, and "c" would transpose all of it)
        strided = shape.stride != (1, 1)
        axis = "k" if strided or ((shape.r, shape.s) == (1, 1) and shape.c > shape.k) else "c"
    if axis == "k":
        # two vectors of lanes unless one channel's S taps would not fit them (AVX2's 7x7 stem)
        kb = next((b for b in (2 * lanes, lanes) if shape.k % b == 0 and b // lanes * shape.s <= acc),
                  cm.largest_divisor(shape.k, 2 * lanes))
        vec = cm.vector_count(kb, lanes)
        cb = cm.largest_divisor(shape.c, max(1, (acc - 4) // (vec * shape.s)))
        grad_image = shape.k * shape.p * shape.q * shape.itemsize
        if shape.formed and (shape.r, shape.s) == (1, 1) and grad_image <= GRAD_IMAGE_BYTES:
            # a 1x1 layer's formed activation: per c tile inside the task, all of K per task
            # (its input read once; see WgradKnobs.tile_prologue)
            return _split_c_tasks(WgradKnobs(axis, kb, cb, shape.c, k_tiles=shape.k // kb, tile_prologue=True),
                                  shape, 1, cores)
        k_tasks = shape.k // kb
    else:
        cb = next((b for b in (2 * lanes, lanes) if shape.c % b == 0), cm.largest_divisor(shape.c, 2 * lanes))
        vec = cm.vector_count(cb, lanes)
        # up to 8 rows, within the accumulators (AVX2, 56x56 1x1 64->256: 2 vectors x 8 rows
        # spill, 85 ms; x 4 rows, 17 ms)
        kb = cm.largest_divisor(shape.k, min(8, acc // vec))
        k_tasks = shape.k // kb
    return _split_c_tasks(WgradKnobs(axis, kb, cb, shape.c), shape, k_tasks, cores)


def _split_c_tasks(kn: WgradKnobs, shape: WgradShape, k_tasks: int, cores: int) -> WgradKnobs:
    """Halve c_task until there are 4 tasks per core (or it no longer halves into c blocks)."""
    c_task = kn.c_task
    while k_tasks * (shape.c // c_task) < 4 * cores and c_task % (2 * kn.c_block) == 0:
        c_task //= 2
    return replace(kn, c_task=c_task)


def fit_wgrad_knobs(kn: WgradKnobs, c: int) -> WgradKnobs:
    """A class member's setting for C input channels: ``c_block`` the largest divisor of C at
    most as large as tuned, ``c_task`` the largest multiple of it dividing C at most as large
    as tuned (densenet121's 14x14 class, tuned at C 992 with c_task 248: C 512 gets 128)."""
    cb = cm.largest_divisor(c, kn.c_block)
    tiles = cm.largest_divisor(c // cb, max(1, kn.c_task // cb))
    return replace(kn, c_block=cb, c_task=cb * tiles)


def wgrad_tile_registers(kn: WgradKnobs, shape: WgradShape) -> int:
    """Accumulator vectors of a knob setting's register tile."""
    if kn.vector_axis == "k":
        return cm.vector_count(kn.k_block, shape.lanes) * kn.c_block * shape.s
    return cm.vector_count(kn.c_block, shape.lanes) * kn.k_block


def wgrad_knob_candidates(shape: WgradShape) -> list[WgradKnobs]:
    """Valid knob settings around the default, for a tuner to measure (default first); tiles
    within the accumulator registers (on AVX2 a larger one spills: 56x56 3x3 64->64, "k"
    lanes, 2 vectors x 4 channels x 3 taps 72 ms, x 1 channel 48 ms)."""
    base = default_wgrad_knobs(shape)
    out = [base]
    lanes = shape.lanes
    for axis in ("k", "c"):
        vec_ext, other = (shape.k, shape.c) if axis == "k" else (shape.c, shape.k)
        vbs = [d for d in (lanes, 2 * lanes) if vec_ext % d == 0] or [cm.largest_divisor(vec_ext, lanes)]
        for vb in vbs:
            for ob in sorted({d for d in (1, 2, 3, 4, 6, 8) if other % d == 0}):
                kb, cb = (vb, ob) if axis == "k" else (ob, vb)
                kn = WgradKnobs(axis, kb, cb, shape.c, base.image_major)
                if wgrad_tile_registers(kn, shape) > shape.accumulators:
                    continue
                while (shape.k // kb) * (shape.c // kn.c_task) < 8 and kn.c_task % (2 * cb) == 0:
                    kn = replace(kn, c_task=kn.c_task // 2)
                if kn not in out:
                    out.append(kn)
    flipped = replace(base, image_major=not base.image_major)
    if flipped not in out:
        out.insert(1, flipped)
    # the default tile with several k tiles per task, while there are tasks for 2 cores
    tiles = 2
    while shape.k % (tiles * base.k_block) == 0 and shape.k // (tiles * base.k_block) * (shape.c // base.c_task) >= 2:
        out.append(replace(base, k_tiles=tiles))
        tiles *= 2
    # each image-major setting with the whole-plane register reduction (on small planes a row
    # is a short run; resnet50's 14x14 1x1 1024->256 with input channels as lanes, 11.2 -> 9.2
    # ms, the best of 34 weight gradients in the Zen 4 batch of tuning_logs/README.md)
    planes = [replace(kn, plane=True) for kn in out if kn.image_major]
    out += [kn for kn in planes if kn not in out]
    # each setting with its activation operand formed the other way (per c tile, or once per
    # call): with input channels as lanes it is always a packed copy; as broadcast scalars, a
    # stage only with a prologue or padding
    twins = [replace(kn, tile_prologue=not kn.tile_prologue) for kn in out if shape.formed or kn.vector_axis == "c"]
    out += [kn for kn in twins if kn not in out]
    return out


def schedule_wgrad(sch: Schedule, family: str, knobs: WgradKnobs | None = None) -> Schedule:
    shape = wgrad_shape(sch, family)
    kn = knobs or default_wgrad_knobs(shape)
    B = cm.blocks(sch)
    wgrad = B["wgrad"]
    kb, cb, ctask = kn.k_block, kn.c_block, kn.c_task
    ktask = kn.k_tiles * kb
    for what, size, block in (("k_block", shape.k, kb), ("c_block", shape.c, cb), ("c_task", shape.c, ctask),
                              ("c_task / c_block", ctask, cb), ("k_tiles * k_block", shape.k, ktask)):
        if size % block:
            raise ValueError(f"{what}={block} does not divide {size}")
    lanes = shape.lanes
    pad = B["pad"]
    if "act" in B:
        sch.compute_inline(B["act"])

    k, c, r, s, rn, rp, rq = sch.get_loops(wgrad)
    ko, k_tile, ki = sch.split(k, [None, ktask // kb, kb])
    c_task, c_tile, c_in = sch.split(c, [None, ctask // cb, cb])
    if kn.vector_axis == "k":
        # tile: (c_block channels x S taps) columns x k_block lanes; per (n, p, c tile, r) the
        # tile stays in registers over q (with `plane`: per (n, c tile, r), over p and q)
        if kn.plane:
            sch.reorder(ko, c_task, rn, c_tile, k_tile, r, rp, rq, c_in, s, ki)
        elif kn.image_major:
            # per image, one c tile at a time over all its rows: the tile's activation planes
            # are read as a few sequential streams, the image's packed gradient stays in cache
            sch.reorder(ko, c_task, rn, c_tile, rp, k_tile, r, rq, c_in, s, ki)
        else:
            sch.reorder(ko, c_task, rn, rp, c_tile, k_tile, r, rq, c_in, s, ki)
        vec = ki
        unrolled = [c_in, s]
        layout = lambda k_, c_, r_, s_: (k_ // kb, c_, r_, s_, k_ % kb)  # noqa: E731
    else:
        # tile: k_block rows x c_block lanes, per (n, p, c tile, r, s), over q (with `plane`:
        # per (n, c tile, r, s), over p and q)
        if kn.plane:
            sch.reorder(ko, c_task, rn, c_tile, k_tile, r, s, rp, rq, ki, c_in)
        elif kn.image_major:
            sch.reorder(ko, c_task, rn, c_tile, rp, k_tile, r, s, rq, ki, c_in)
        else:
            sch.reorder(ko, c_task, rn, rp, c_tile, k_tile, r, s, rq, ki, c_in)
        vec = c_in
        unrolled = [ki]
        layout = lambda k_, c_, r_, s_: (c_ // cb, k_, r_, s_, c_ % cb)  # noqa: E731
    if kn.plane:
        sch.fuse(rp, rq)
    task = sch.fuse(ko, c_task)
    sch.parallel(task)
    acc = sch.cache_write(wgrad, 0, "local")
    sch.transform_layout(wgrad, ("write", 0), layout)
    sch.reverse_compute_at(acc, task)
    vl = cm.largest_divisor(int(sch.get(vec).extent), lanes)
    vo, vi = sch.split(vec, [None, vl])
    if vl > 1:
        sch.vectorize(vi)
    for loop in [*unrolled, vo]:
        sch.unroll(loop)
    sch.decompose_reduction(wgrad, rn)
    _vectorize_inner(sch, acc, lanes)

    if kn.vector_axis == "k":
        # gradient (grad prologue applied) -> [n, k//kb, p, q, k%kb], once per call
        if "grad" in B:
            gblk = B["grad"]
        else:
            gblk = sch.cache_read(wgrad, cm.read_index(sch, wgrad, "grad"), "global")
        sch.transform_layout(gblk, ("write", 0), lambda n_, k_, p_, q_: (n_, k_ // kb, p_, q_, k_ % kb))
        cm.pack_channel_blocks(sch, gblk, kb)
        if "act" not in B and cm.is_identity_pad(sch, pad):
            # the input itself is the broadcast operand: no copy of it
            sch.compute_inline(pad)
        elif kn.tile_prologue:
            # the c tile's planes of one image, formed inside the task where the tile's
            # reduction reads them (L1/L2-resident), instead of a whole NCHW copy written
            # and read back
            sch.compute_at(pad, c_tile, preserve_unit_loops=True)
            sch.fuse(*cm.loops_under(sch, pad, c_tile)[-2:])
            _vectorize_inner(sch, pad, lanes)
        else:
            # activation (prologue, zero padding) in NCHW, read as broadcast scalars
            _schedule_spatial_root(sch, pad, lanes)
    else:
        # activation -> [n, c//cb, y, x, c%cb]; the gradient is read as broadcast scalars
        sch.transform_layout(pad, ("write", 0), lambda n_, c_, y_, x_: (n_, c_ // cb, y_, x_, c_ % cb))
        cm.pack_channel_blocks(sch, pad, cb, task=c_tile if kn.tile_prologue else None)
        if "grad" in B:
            sch.compute_at(B["grad"], rn, preserve_unit_loops=True)  # loops (k, p, q) under rn
            sch.fuse(*sch.get_loops(B["grad"])[-2:])  # vectors run over the plane, not one row
            _vectorize_inner(sch, B["grad"], lanes)
    return sch


class WgradTemplate:
    """Weight-gradient convolution with optional grad prologue and activation prologue.

    A GEMM over the long (n, p, q) reduction into the small dw, register-tiled with one
    channel axis as vector lanes (``WgradKnobs.vector_axis``):

    - "k": the gradient (grad prologue applied) is packed once to ``[n, k // k_block, p, q,
      k % k_block]``; tile = ``k_block`` lanes x (``c_block`` channels x S taps) columns, fed by
      gradient vectors and broadcast activation scalars (the activation, with its prologue
      and zero padding, formed once in NCHW; without either, the input itself: copying it
      cost a 56x56 1x1 weight gradient a third of its time). Any C, e.g. the 3-channel stem.
    - "c": the activation (prologue, padding) is packed once to ``[n, c // c_block, y, x,
      c % c_block]``; tile = ``k_block`` rows x ``c_block`` lanes per tap, fed by broadcast
      gradient scalars. The grad prologue is formed per image inside each task, for the
      task's output channels, and read from cache instead of being written to memory
      and read back (measured on AVX-512, resnet50, in alternation with the up-front pass:
      56x56 1x1 64->256 8.6 -> 6.5 ms, 28x28 1x1 128->512 6.5 -> 4.8 ms, 14x14 1x1 256->1024
      5.2 -> 4.9 ms, 3x3 layers 0-8% faster; a task per (k block, c block) forms it once per
      c block. For "k" the same placement of the packed gradient lost, 15.2 -> 16.0 ms on
      the 56x56 3x3 stride-2 layer, so "k" packs it once per call).

    Per gradient row (n, p) and tile the accumulators stay in registers over q. Each task
    owns a (k_block, c_task) block of dw at all taps and reduces every output in a fixed
    (n, p, q) order: deterministic, no atomics.

    Knobs: ``WgradKnobs``; defaults by ``default_wgrad_knobs``, alternatives by
    ``wgrad_knob_candidates``.
    """

    @staticmethod
    def apply(func, family: str, knobs: WgradKnobs | None = None):
        sch = Schedule(func)
        if "wgrad" not in cm.blocks(sch):
            return None
        return schedule_wgrad(sch, family, knobs)


class GradStatsTemplate:
    """The standalone BatchNorm(+ReLU) backward: parallel over (n, h) rows; each task writes
    its row of dz (vectorized) and adds it into its own row partials, as in ``DgradTemplate``."""

    @staticmethod
    def apply(func, family: str):
        sch = Schedule(func)
        blocks = cm.blocks(sch)
        if set(blocks) != {"dz", "tile_dbeta", "tile_dgamma"}:
            return None
        dz = blocks["dz"]
        lanes = vector_lanes(family, _dtype(sch, dz))
        n, c, y, x = sch.get_loops(dz)
        xo, xi = sch.split(x, [None, cm.largest_divisor(cm.extents(sch, [x])[0], lanes)])
        sch.reorder(n, y, c, xo, xi)
        row = sch.fuse(n, y)
        sch.parallel(row)
        sch.vectorize(xi)
        for name in ("tile_dbeta", "tile_dgamma"):
            _row_partials(sch, blocks[name], row, lanes)
        return sch


BACKWARD_TEMPLATES = [DgradTemplate, WgradTemplate, GradStatsTemplate]
