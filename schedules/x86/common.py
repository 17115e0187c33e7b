"""Helpers shared by the x86 templates (no template lives here)."""
from __future__ import annotations

from dataclasses import replace

from tvm.s_tir import Schedule
from tvm.tirx import IterVar


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of n that is at most cap (at least 1)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def vector_count(channels: int, lanes: int) -> int:
    """Vector registers that `channels` consecutive values take, vectorized at most `lanes` wide."""
    return max(1, channels // largest_divisor(channels, lanes))


def blocks(sch: Schedule) -> dict[str, object]:
    """The root's child blocks by name."""
    root = sch.get_sblock("root")
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(root)}


def extents(sch: Schedule, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def dtype_of(sch: Schedule, block) -> str:
    return str(sch.get(block).writes[0].source.dtype)


def read_index(sch: Schedule, block, buffer_name: str) -> int:
    """Position of the buffer named `buffer_name` among a block's reads."""
    for i, region in enumerate(sch.get(block).reads):
        if region.source.name == buffer_name:
            return i
    raise KeyError(f"block {sch.get(block).name_hint} does not read {buffer_name}")


def loops_under(sch: Schedule, block, loop) -> list:
    """The loops of `block` nested inside `loop` (which must enclose it)."""
    loops = sch.get_loops(block)
    target = sch.get(loop)
    for i, candidate in enumerate(loops):
        if sch.get(candidate).same_as(target):
            return list(loops[i + 1:])
    raise ValueError("loop does not enclose block")


def pack_channel_blocks(sch: Schedule, stage, block: int, task=None) -> None:
    """Loop order of a packing stage written [n, c // block, y, x, c % block] (its layout
    transformed already): inside `task`, one image into a task-local workspace while it is in
    cache; without one, once per call, parallel over (n, channel block, row).

    Vectorized over the block's channels (a strided gather per vector, contiguous stores):
    the scalar transposition cost 3.7 ms against 0.6 ms for 16x128x56x56 fp32 into blocks of
    32 (AVX-512, 2 threads), and densenet121's 56x56 1x1 256->128 weight gradient went
    15.0 -> 11.3 ms. A one-channel block (an NCHW copy) is left to LLVM: vectors along a
    padded row (58 columns: 2 lanes) cost a 56x56 3x3 data gradient 10%.
    """
    if task is not None:
        sch.compute_at(stage, task, preserve_unit_loops=True)
        c, y, x = loops_under(sch, stage, task)[-3:]
        co, ci = sch.split(c, [None, block])
        sch.reorder(co, y, x, ci)
    else:
        n, c, y, x = sch.get_loops(stage)
        co, ci = sch.split(c, [None, block])
        sch.reorder(n, co, y, x, ci)
        sch.parallel(sch.fuse(n, co, y))
    if block > 1:
        sch.vectorize(ci)


def pack_weights(sch: Schedule, stage, k_block: int, c_block: int, vector_axis: str) -> None:
    """Loop order of a weight-packing stage (loops k, c, r, s of w) written [a // a_block,
    b // b_block, r, s, b % b_block, a % a_block], with (a, b) = (k, c) when `vector_axis`
    is "k" (the forward conv) and (c, k) when it is "c" (the data gradient): parallel over
    the two outer blocks, vectorized over the innermost (a strided gather per vector,
    contiguous stores). The scalar loop in w's order cost 0.74 ms against 0.34 ms for
    512x512x3x3 fp32 (AVX-512, 2 threads), 9% of resnet50's 7x7 3x3 forward kernel.
    """
    k, c, r, s = sch.get_loops(stage)
    ko, ki = sch.split(k, [None, k_block])
    co, ci = sch.split(c, [None, c_block])
    outer, inner = ((ko, co), (ci, ki)) if vector_axis == "k" else ((co, ko), (ki, ci))
    sch.reorder(*outer, r, s, *inner)
    sch.parallel(sch.fuse(*outer))
    if (k_block if vector_axis == "k" else c_block) > 1:
        sch.vectorize(inner[-1])


def is_spatial(sch: Schedule, block) -> bool:
    return all(iv.iter_type == IterVar.DataPar for iv in sch.get(block).iter_vars)


def is_identity_pad(sch: Schedule, block) -> bool:
    """A padding stage that pads nothing (same shape as what it reads)."""
    out = list(sch.get(block).writes[0].source.shape)
    return all(list(r.source.shape) == out for r in sch.get(block).reads if len(r.source.shape) == len(out))


def iter_order(sch: Schedule, block, order: list) -> None:
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


def parallel_vectorize(sch: Schedule, block, lanes: int) -> None:
    """Spatial block: fuse and parallelize the outer loops, vectorize a divisor of the last."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = extents(sch, [inner])[0]
    v = largest_divisor(extent, lanes)
    if v > 1:
        outer_part, inner = sch.split(inner, [None, v])
        loops = list(loops[:-1]) + [outer_part]
        sch.vectorize(inner)
    else:
        loops = list(loops[:-1]) + [inner]
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    elif extents(sch, loops)[0] > 1:
        sch.parallel(loops[0])


def vectorize_inner(sch: Schedule, block, lanes: int) -> None:
    """Vectorize a divisor of a block's innermost loop."""
    inner = sch.get_loops(block)[-1]
    v = largest_divisor(extents(sch, [inner])[0], lanes)
    if v > 1:
        sch.vectorize(sch.split(inner, [None, v])[1])


def plane_reductions(sch: Schedule, names, lanes: int, at=None) -> None:
    """Per-plane sums (blocks [n, c] reducing over a plane [h, w]), vectorized.

    The plane is flattened and split into `lanes` interleaved partial sums (rfactor): the
    partials are added with vector instructions, in a fixed order, then summed. With `at`
    (a loop that owns whole planes, e.g. a conv's (n, channel block) task) the sums run
    under it, right after the task wrote its planes; else each is its own parallel pass.
    Blocks are scheduled in the order given (a later one may read an earlier one's result).
    """
    for name, block in names:
        n, c, rh, rw = sch.get_loops(block)
        size = extents(sch, [rh])[0] * extents(sch, [rw])[0]
        lane = largest_divisor(size, lanes)
        _, li = sch.split(sch.fuse(rh, rw), [None, lane])
        rf = sch.rfactor(li, factor_axis=2)
        iter_order(sch, rf, [("write", 0), ("write", 1), None, ("write", 2)])
        if at is not None:
            sch.reverse_compute_at(rf, at, preserve_unit_loops=True)
            sch.reverse_compute_at(block, at, preserve_unit_loops=True)
        else:
            sch.parallel(sch.fuse(*sch.get_loops(rf)[:2]))
            sch.parallel(sch.fuse(*sch.get_loops(block)[:2]))
        # rf loops: [n, c] (fused, or under `at`), the reduction loops, the lane loop
        loops = loops_under(sch, rf, at) if at is not None else sch.get_loops(rf)
        first_reduction = loops[2] if at is not None else loops[1]
        if lane > 1:
            sch.vectorize(loops[-1])
        sch.decompose_reduction(rf, first_reduction)


def _conjuncts(cond) -> list:
    from tvm.tirx import And

    return _conjuncts(cond.a) + _conjuncts(cond.b) if isinstance(cond, And) else [cond]


def zero_border(sch: Schedule, pad_block) -> tuple | None:
    """(store, inside) of a padding stage whose store is ``if_then_else(inside, value, 0)``
    and whose rows or columns outnumber its source's (the zeros are its border); None for
    one without a border (an identity padding keeps the form, with a condition always true)."""
    from tvm.tirx import BufferStore, FloatImm, IntImm

    sblock = sch.get(pad_block)
    rows_cols = [int(d) for d in sblock.writes[0].source.shape[2:4]]  # both layouts keep dims 2, 3
    sources = [[int(d) for d in r.source.shape[2:4]] for r in sblock.reads if len(r.source.shape) == 4]
    if all(src == rows_cols for src in sources):
        return None
    store = sblock.body
    call = getattr(store, "value", None) if isinstance(store, BufferStore) else None
    op = getattr(getattr(call, "op", None), "name", "")
    if not op.endswith("if_then_else"):
        return None
    zero = call.args[2]
    if not (isinstance(zero, (FloatImm, IntImm)) and zero.value == 0):
        return None
    return store, call.args[0]


def skip_zero_border(sch: Schedule, block, pad_block, dims: tuple[int, ...]) -> bool:
    """Predicate a convolution's reduction update `block` (``acc += pad[...] * w[...]``) so
    that the taps reading the zero border of the padding stage `pad_block` do no work: the
    border's products are exact zeros, so the result is bitwise the same.

    `dims`: which dimensions of the padded buffer to test (2: rows, 3: columns, as both
    padded layouts keep them). A condition on loops that stay loops is a branch around the
    tile's FMAs: cheap for rows (the same outcome over the whole inner reduction), too costly
    for columns, which the caller should test only when the column and column-tap loops are
    unrolled (the condition is then folded away at compile time). On 3x3 pad-1 layers a
    7x7 plane wastes 2 of 9 rows and columns on zeros.

    The predicate is not a schedule primitive, so a trace does not record it: the caller
    annotates the block (``BORDER_ANNOTATION``) and ``apply_border_predicates`` puts it back
    on a schedule replayed from a trace. A block predicated already is left as it is.
    Returns whether a predicate was added."""
    import tvm
    from tvm import s_tir, tirx
    from tvm.sym.analyzer import Analyzer
    from tvm.tirx.analysis import undefined_vars

    border = zero_border(sch, pad_block)
    if border is None:
        return False
    store, inside = border
    tested = {store.indices[d] for d in dims if isinstance(store.indices[d], tirx.Var)}
    parts = [c for c in _conjuncts(inside)
             if undefined_vars(c, []) and all(any(v.same_as(t) for t in tested) for v in undefined_vars(c, []))]
    sblock = sch.get(block)
    reads = [r for r in sblock.reads if r.source.same_as(store.buffer)]
    loop = sch.get_loops(block)[-1]
    realize = sch.get(loop).body
    if not parts or len(reads) != 1 or not isinstance(realize, s_tir.SBlockRealize):
        return False
    if not (isinstance(realize.predicate, tirx.IntImm) and realize.predicate.value):
        return False  # predicated already
    to_read, to_loops = Analyzer(), Analyzer()
    for index, read in zip(store.indices, reads[0].region):
        if isinstance(index, tirx.Var):
            to_read.bind(index, read.min)
    for iv, value in zip(sblock.iter_vars, realize.iter_values):
        to_loops.bind(iv.var, value)
    for outer in sch.get_loops(block):  # their ranges let conditions true on every tap fold
        stmt = sch.get(outer)
        to_loops.bind(stmt.loop_var, tvm.ir.Range.from_min_extent(stmt.min, stmt.extent))
    cond = to_loops.simplify(to_read.simplify(tirx.all(*parts)))
    if isinstance(cond, tirx.IntImm) and cond.value:
        return False  # no tap of this block reaches the border
    loop_stmt = sch.get(loop)
    new_loop = tirx.For(loop_stmt.loop_var, loop_stmt.min, loop_stmt.extent, loop_stmt.kind,
                        s_tir.SBlockRealize(realize.iter_values, cond, realize.block),
                        loop_stmt.thread_binding, loop_stmt.annotations)
    sch.state.replace(sch.get_sref(loop), new_loop, {realize.block: realize.block})
    return True


# on a reduction update block: "<padding stage>:<dims>", the border test skip_zero_border applies
BORDER_ANNOTATION = "tvm_rbn.skip_border"


def apply_border_predicates(func):
    """The PrimFunc with every ``BORDER_ANNOTATION`` block predicated (``skip_zero_border``):
    for a schedule replayed from a trace (MetaSchedule's search, a record without knobs),
    which keeps the annotation and the unrolled loops but not the predicate."""
    sch = Schedule(func)
    named = blocks(sch)
    for block in named.values():
        value = sch.get(block).annotations.get(BORDER_ANNOTATION)
        if value is not None:
            pad, dims = str(value).split(":")
            skip_zero_border(sch, block, named[pad], tuple(int(d) for d in dims.split(",")))
    return sch.mod["main"]


# column tiles of a row that skip_border_taps unrolls to fold the column conditions away
UNROLLED_COLUMN_TILES = 2
# default: skip border taps for stride-1 layers on planes at most SKIP_BORDER_MAX_WIDTH wide
# whose reduction has at least SKIP_BORDER_MIN_CHANNELS channels. Measured on Zen 4 (AVX-512,
# batch 16, each kernel's tuned tile, forward / data gradient, off -> on): resnet50 7x7 3x3 512
# 18.4 -> 15.6 / 18.1 -> 15.4 ms, 14x14 3x3 256 18.0 -> 16.5 / 18.9 -> 17.7 ms; 28x28 3x3 128
# 17.7 -> 17.5 / 18.2 -> 20.3 ms (a row's border is a smaller share there than the branches
# cost); densenet121's 3x3 128 -> 32 layers mixed (14x14 data gradient, 32 channels reduced:
# 2.07 -> 2.63 ms; 7x7 0.44 -> 0.39 ms); strided forward layers slower (56x56 stride 2: 18.1 ->
# 25.0 ms). The tuner measures both choices for every kernel (``with_border_choice``).
SKIP_BORDER_MAX_WIDTH = 14
SKIP_BORDER_MIN_CHANNELS = 256


def skips_border_by_default(border: bool, stride_one: bool, width: int, reduced_channels: int) -> bool:
    return border and stride_one and width <= SKIP_BORDER_MAX_WIDTH and reduced_channels >= SKIP_BORDER_MIN_CHANNELS


def skip_border_taps(sch: Schedule, block, pad_block, column_tiles, column_taps) -> bool:
    """``skip_zero_border`` for a register-tiled convolution: rows always; columns when the
    loop over a row's column tiles has at most UNROLLED_COLUMN_TILES iterations, by unrolling
    it and the column-tap loop so that each (column, tap) condition is a constant."""
    if zero_border(sch, pad_block) is None:
        return False
    columns = extents(sch, [column_tiles])[0] <= UNROLLED_COLUMN_TILES
    if columns:
        sch.unroll(column_taps)
        if extents(sch, [column_tiles])[0] > 1:
            sch.unroll(column_tiles)
    dims = (2, 3) if columns else (2,)
    sch.annotate(block, BORDER_ANNOTATION, f"{sch.get(pad_block).name_hint}:{','.join(map(str, dims))}")
    return skip_zero_border(sch, block, pad_block, dims)


def with_border_choice(candidates: list, border: bool) -> list:
    """Knob candidates, each also with ``skip_border`` flipped when the input has a border."""
    if not border:
        return candidates
    return candidates + [flipped for flipped in (replace(kn, skip_border=not kn.skip_border) for kn in candidates)
                         if flipped not in candidates]
