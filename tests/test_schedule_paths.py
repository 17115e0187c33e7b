"""The x86 templates' code paths that the per-operator tests' small shapes do not reach.

The default knobs depend on the shape (schedules/x86/conv.py, backward.py): batches of 4+
images per core pair take per-image tasks with in-task packing and in-task statistics; large
enough (image, channel block) task counts keep the statistics in-task without them; long or
short packed channel blocks; wgrad lanes over output or input channels, image-major or not;
dgrad stride phases whose row count does not divide the height. Each case runs the kernel
through the functional API (so through the default template the build uses) and compares
every output with the references, for kernels scheduled with the default knobs and with
alternative knobs from the candidate lists.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn.functional as rbn
from tvm_rbn.ops.reference import conv2d_bn_backward as ref_convb

from conftest import assert_close

# (id, N, C, H, W, K, R, stride, padding)
SHAPES = [
    ("per-image-3x3", 4, 20, 9, 9, 48, 3, 1, 1),
    ("per-image-long-blocks", 4, 64, 6, 6, 64, 3, 1, 1),  # K*R*S >= 512: 64-channel blocks
    ("stride3-uneven-rows", 4, 20, 10, 6, 32, 3, 3, 0),  # 10 % 3 != 0
    ("stride2-1x1-reduce", 4, 48, 8, 8, 16, 1, 2, 0),  # wgrad lanes over K
    ("tasks-in-task-stats", 2, 256, 5, 5, 256, 3, 1, 1),  # 2 images x 8 channel blocks: 16 tasks
]
IDS = [s[0] for s in SHAPES]


def _coeffs(c, dtype):
    invstd = torch.rand(c, dtype=dtype) + 0.5
    scale = invstd * (torch.rand(c, dtype=dtype) + 0.5)
    return rbn.BNCoefficients(scale, torch.randn(c, dtype=dtype) - 0.3, torch.randn(c, dtype=dtype), invstd)


def _out_hw(h, w, r, stride, padding):
    return (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_paths(shape, dtype):
    _, n, c, h, w, k, r, stride, padding = shape
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c, r, r, dtype=dtype) / (c * r * r) ** 0.5
    co = _coeffs(c, dtype)
    with torch.no_grad():
        y, tile_sum, tile_m2 = rbn.bn_relu_conv2d_stats(x, co.scale, co.shift, weight, stride, padding)
    a = torch.relu(x * co.scale[:, None, None] + co.shift[:, None, None])
    ref = F.conv2d(a, weight, stride=stride, padding=padding)
    assert_close(y, ref, "y")
    ref_sum = ref.sum((2, 3))
    ref_m2 = ((ref - ref.mean((2, 3), keepdim=True)) ** 2).sum((2, 3))
    plane = float(ref.abs().sum() / (n * k))
    assert_close(tile_sum, ref_sum, "tile_sum", scale=plane)
    assert_close(tile_m2, ref_m2, "tile_m2", scale=float(ref_m2.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_paths(shape, dtype):
    _, n, c, h, w, k, r, stride, padding = shape
    p, q = _out_hw(h, w, r, stride, padding)
    weight = torch.randn(k, c, r, r, dtype=dtype)
    grad = rbn.DeferredGrad(torch.randn(n, k, p, q, dtype=dtype), torch.randn(n, k, p, q, dtype=dtype),
                            torch.rand(k, dtype=dtype) + 0.5, torch.randn(k, dtype=dtype) * 0.1,
                            torch.randn(k, dtype=dtype))
    x_raw = torch.randn(n, c, h, w, dtype=dtype)
    co = _coeffs(c, dtype)
    with torch.no_grad():
        dz, tile_dbeta, tile_dgamma = rbn.conv2d_dgrad_bn_relu(grad, weight, x_raw, co, stride, padding)
        dw = rbn.bn_relu_conv2d_wgrad(grad, x_raw, co.scale, co.shift, (r, r), stride, padding)
    ref_dz, ref_dbeta, ref_dgamma = ref_convb.conv2d_dgrad(
        grad, weight, x_raw, co.scale, co.shift, co.mean, co.invstd, (h, w), stride, padding, True)
    assert_close(dz, ref_dz, "dz")
    plane = float(ref_dz.abs().sum() / (n * c))
    assert_close(tile_dbeta, ref_dbeta, "tile_dbeta", scale=plane)
    assert_close(tile_dgamma, ref_dgamma, "tile_dgamma", scale=plane * 4)
    ref_dw = ref_convb.conv2d_wgrad(grad, x_raw, co.scale, co.shift, (r, r), stride, padding, True)
    assert_close(dw, ref_dw, "dw")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_knob_candidates_compile_and_agree(shape, tmp_path):
    """A few alternatives from each candidate list give the default's results (the knobs a
    tuner samples must all be valid)."""
    pytest.importorskip("tvm")
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from tvm_rbn.build.target import host_family, host_tvm_target
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.runtime import load_module
    from tvm_rbn.schedules.x86 import backward as bw
    from tvm_rbn.schedules.x86 import conv as cv

    _, n, c, h, w, k, r, stride, padding = shape
    common = dict(n=n, c=c, h=h, w=w, k=k, r=r, s=r, stride=(stride, stride), padding=(padding, padding),
                  dtype="float32")
    family = host_family()
    kinds = [
        (KernelSpec.make("conv2d_fused", **common, prologue_relu=True, stats=True), cv.conv_shape,
         cv.knob_candidates, cv.schedule_conv),
        (KernelSpec.make("conv2d_dgrad", **common, grad_prologue=True, epilogue_relu=True), bw.dgrad_shape,
         bw.dgrad_knob_candidates, bw.schedule_dgrad),
        (KernelSpec.make("conv2d_dgrad", **common, grad_prologue=True, epilogue_relu=True, accumulate=True),
         bw.dgrad_shape, bw.dgrad_knob_candidates, bw.schedule_dgrad),
        (KernelSpec.make("conv2d_wgrad", **common, grad_prologue=True, prologue_relu=True), bw.wgrad_shape,
         bw.wgrad_knob_candidates, bw.schedule_wgrad),
    ]
    for kind, (spec, shape_of, candidates, schedule) in enumerate(kinds):
        func = te.create_prim_func(spec.build_args())
        cands = candidates(shape_of(Schedule(func), family))
        picked = [cands[0]] + cands[1::max(1, len(cands) // 3)][:3]
        outs = []
        torch.manual_seed(0)
        args = [torch.randn(*[int(d) for d in t.shape]) if isinstance(t.op, te.PlaceholderOp)
                else torch.zeros(*[int(d) for d in t.shape]) for t in spec.build_args()]
        n_out = sum(1 for t in spec.build_args() if not isinstance(t.op, te.PlaceholderOp))
        for i, knobs in enumerate(picked):
            sch = schedule(Schedule(func), family, knobs)
            lib = tvm.compile(tvm.IRModule({"k": sch.mod["main"].with_attr("global_symbol", "k")}),
                              target=host_tvm_target())
            path = tmp_path / f"{spec.op}_{kind}_{i}.so"
            lib.export_library(str(path))
            run = [a.clone() for a in args]
            load_module(path)["k"](*run)
            outs.append(run[-n_out:])
        for got, knobs in zip(outs[1:], picked[1:]):
            for g, e in zip(got, outs[0]):
                assert_close(g, e, f"{spec.op} with {knobs}", scale=max(1.0, float(e.abs().max())))


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_bare_input_is_read_in_place(stride, tmp_path):
    """A 1x1 conv without prologue reads its NCHW input directly (no packed copy) by default;
    packing it anyway (direct_input=False, the setting of older records) gives the same result."""
    pytest.importorskip("tvm")
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from tvm_rbn.build.target import host_family, host_tvm_target
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.runtime import load_module
    from tvm_rbn.schedules.x86 import conv as cv

    n, c, h, k = 4, 48, 8, 32
    spec = KernelSpec.make("conv2d_fused", n=n, c=c, h=h, w=h, k=k, r=1, s=1, stride=(stride, stride),
                           padding=(0, 0), dtype="float32", prologue_relu=None, stats=True)
    func = te.create_prim_func(spec.build_args())
    family = host_family()
    default = cv.default_knobs(cv.conv_shape(Schedule(func), family))
    assert default.direct_input
    torch.manual_seed(0)
    x = torch.randn(n, c, h, h)
    weight = torch.randn(k, c, 1, 1) / c ** 0.5
    ref = F.conv2d(x, weight, stride=stride)
    for direct in (True, False):
        sch = cv.schedule_conv(Schedule(func), family, cv.ConvKnobs(**{**default.as_dict(), "direct_input": direct}))
        allocated = {b.name for b in sch.mod["main"].body.block.alloc_buffers}
        assert ("pad" in allocated) != direct, f"direct_input={direct}: buffers {sorted(allocated)}"
        lib = tvm.compile(tvm.IRModule({"k": sch.mod["main"].with_attr("global_symbol", "k")}), target=host_tvm_target())
        lib.export_library(str(tmp_path / f"k{direct}.so"))
        y, tile_sum, tile_m2 = torch.zeros_like(ref), torch.zeros(n, k), torch.zeros(n, k)
        load_module(tmp_path / f"k{direct}.so")["k"](x, weight, y, tile_sum, tile_m2)
        assert_close(y, ref, f"y, direct_input={direct}")
        assert_close(tile_sum, ref.sum((2, 3)), f"tile_sum, direct_input={direct}", scale=float(ref.abs().sum() / n / k))



@pytest.mark.parametrize("r, stride, h", [(1, 1, 8), (3, 1, 8), (3, 2, 8), (3, 1, 1)],
                         ids=["1x1", "3x3", "3x3-stride2", "3x3-on-1x1-planes"])
def test_wgrad_gradient_operand_placement(r, stride, h, tmp_path):
    """With input channels as lanes the weight gradient forms its gradient operand (the grad
    prologue) per image inside each parallel task; with output channels as lanes it packs it
    once per call. Both give the reference dw, with one k tile per task and with two, with the
    register tile reduced row by row and over whole planes, and with the activation operand
    formed per c tile inside the task (``tile_prologue``) or once per call."""
    pytest.importorskip("tvm")
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from tvm_rbn.build.target import host_family, host_tvm_target
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.runtime import load_module
    from tvm_rbn.schedules.x86 import backward as bw

    n, c, k, padding = 4, 32, 64, r // 2
    spec = KernelSpec.make("conv2d_wgrad", n=n, c=c, h=h, w=h, k=k, r=r, s=r, stride=(stride, stride),
                           padding=(padding, padding), dtype="float32", grad_prologue=True, prologue_relu=True)
    func = te.create_prim_func(spec.build_args())
    family = host_family()
    candidates = bw.wgrad_knob_candidates(bw.wgrad_shape(Schedule(func), family))
    assert any(kn.plane for kn in candidates), "the tuner never sees the whole-plane reduction"
    p, _ = _out_hw(h, h, r, stride, padding)
    torch.manual_seed(0)
    grad = rbn.DeferredGrad(torch.randn(n, k, p, p), torch.randn(n, k, p, p), torch.rand(k) + 0.5,
                            torch.randn(k) * 0.1, torch.randn(k))
    x_raw = torch.randn(n, c, h, h)
    co = _coeffs(c, torch.float32)
    ref = ref_convb.conv2d_wgrad(grad, x_raw, co.scale, co.shift, (r, r), stride, padding, True)
    assert any(kn.tile_prologue for kn in candidates if kn.vector_axis == "k"), "no formed activation per c tile"
    settings = [*itertools.product(("c", "k"), (1, 2), (False,), (False,)), ("c", 2, True, False),
                ("k", 1, True, False), ("c", 1, False, True), ("k", 2, False, True), ("k", 1, True, True)]
    for axis, k_tiles, plane, tile_prologue in settings:
        knobs = replace(next(kn for kn in candidates if kn.vector_axis == axis), k_tiles=k_tiles, plane=plane,
                        tile_prologue=tile_prologue)
        sch = bw.schedule_wgrad(Schedule(func), family, knobs)
        task = sch.get(sch.get_loops(sch.get_sblock("wgrad_update"))[0])
        in_task = sch.get(sch.get_loops(sch.get_sblock("grad"))[0]).same_as(task)
        assert in_task == (axis == "c"), f"{knobs}: gradient formed {'in' if in_task else 'outside'} the task"
        act_in_task = sch.get(sch.get_loops(sch.get_sblock("pad"))[0]).same_as(task)
        assert act_in_task == tile_prologue, f"{knobs}: activation formed {'in' if act_in_task else 'outside'} the task"
        lib = tvm.compile(tvm.IRModule({"k": sch.mod["main"].with_attr("global_symbol", "k")}),
                          target=host_tvm_target())
        path = tmp_path / f"wgrad_{axis}_{k_tiles}_{plane}_{tile_prologue}.so"
        lib.export_library(str(path))
        dw = torch.zeros(k, c, r, r)
        load_module(path)["k"](grad.dz, grad.x, grad.c1, grad.c2, grad.c3, x_raw, co.scale, co.shift, dw)
        assert_close(dw, ref, f"dw, {knobs}", scale=max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("prologue_relu", [True, None], ids=["bn-relu-input", "plain-input"])
def test_wgrad_1x1_default_forms_its_activation_per_c_tile(prologue_relu):
    """A 1x1 weight gradient that reduces channels and recomputes its input from the previous
    BatchNorm (DenseNet's block buffers) forms that input per c tile inside the task, with
    all of K in one task, so the input is read once and no NCHW copy goes to memory; one that
    reads its input as is has nothing to form."""
    pytest.importorskip("tvm")
    from tvm.s_tir import Schedule

    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.schedules.x86 import backward as bw

    spec = KernelSpec.make("conv2d_wgrad", n=16, c=992, h=14, w=14, k=128, r=1, s=1, stride=(1, 1),
                           padding=(0, 0), dtype="float32", grad_prologue=True, prologue_relu=prologue_relu)
    shape = bw.wgrad_shape(Schedule(spec.prim_func()), "x86-avx512")
    knobs = bw.default_wgrad_knobs(shape, cores=2)
    assert shape.formed == (prologue_relu is not None)
    assert knobs.vector_axis == "k", knobs
    assert knobs.tile_prologue == shape.formed, knobs
    assert (knobs.k_tiles * knobs.k_block == shape.k) == shape.formed, knobs
    tasks = shape.k // (knobs.k_tiles * knobs.k_block) * shape.c // knobs.c_task
    assert tasks >= 4, f"{tasks} tasks for 2 cores: {knobs}"
    in_task = {kn.tile_prologue for kn in bw.wgrad_knob_candidates(shape) if kn.vector_axis == "k"}
    assert in_task == ({False, True} if shape.formed else {False}), in_task


def test_class_setting_refitted_to_a_members_channels(tmp_path):
    """A structure class is tuned as its largest member; another member's input channels may
    not divide the tuned blocks (densenet121's 14x14 1x1 class at C 992, c_task 248; C 512).
    The build refits those blocks (the largest divisors at most as large as tuned) instead of
    dropping the tuned setting for the default one, and the kernel stays exact."""
    pytest.importorskip("tvm")
    import tvm

    from tvm_rbn.build.target import host_family, host_tvm_target
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.runtime import load_module
    from tvm_rbn.schedules.x86.space import apply_knobs, knobs_of

    family = host_family()
    n, c, h, k = 2, 96, 4, 32
    spec = KernelSpec.make("conv2d_wgrad", n=n, c=c, h=h, w=h, k=k, r=1, s=1, stride=(1, 1), padding=(0, 0),
                           dtype="float32", grad_prologue=True, prologue_relu=True)
    tuned = {"template": "wgrad", "knobs": {"vector_axis": "k", "k_block": 16, "c_block": 8, "c_task": 64,
                                            "k_tiles": 2, "tile_prologue": True}}
    func = spec.prim_func().with_attr("global_symbol", "k")
    assert apply_knobs(func, family, tuned) is None, "c_task 64 does not divide 96: refused unless refitted"
    sch = apply_knobs(func, family, tuned, fit=True)
    assert sch is not None
    assert knobs_of(sch.trace)["knobs"] == {**tuned["knobs"], "c_task": 48, "image_major": True, "plane": False}
    path = tmp_path / "member.so"
    tvm.compile(tvm.IRModule({"k": sch.mod["main"]}), target=host_tvm_target()).export_library(str(path))
    torch.manual_seed(0)
    grad = rbn.DeferredGrad(torch.randn(n, k, h, h), torch.randn(n, k, h, h), torch.rand(k) + 0.5,
                            torch.randn(k) * 0.1, torch.randn(k))
    x_raw, co = torch.randn(n, c, h, h), _coeffs(c, torch.float32)
    dw = torch.zeros(k, c, 1, 1)
    load_module(path)["k"](grad.dz, grad.x, grad.c1, grad.c2, grad.c3, x_raw, co.scale, co.shift, dw)
    ref = ref_convb.conv2d_wgrad(grad, x_raw, co.scale, co.shift, (1, 1), (1, 1), (0, 0), True)
    assert_close(dw, ref, "dw with the refitted class setting", scale=max(1.0, float(ref.abs().max())))

    conv = KernelSpec.make("conv2d_fused", n=n, c=c, h=h, w=h, k=k, r=1, s=1, stride=(1, 1), padding=(0, 0),
                           dtype="float32", prologue_relu=True, stats=True).prim_func()
    tuned_conv = {"template": "conv", "knobs": {"oc_block": 32, "ow_block": 4, "ic_block": 64, "ic_chunks": 1}}
    assert apply_knobs(conv, family, tuned_conv) is None
    assert knobs_of(apply_knobs(conv, family, tuned_conv, fit=True).trace)["knobs"]["ic_block"] == 48


PACKING_STAGES = ("pad", "grad_pad", "grad", "grad_global", "w_global")


@pytest.mark.parametrize("op, axis", [("conv2d_fused", None), ("conv2d_dgrad", None),
                                      ("conv2d_wgrad", "k"), ("conv2d_wgrad", "c")],
                         ids=["forward", "dgrad", "wgrad-k-lanes", "wgrad-c-lanes"])
def test_packing_stages_are_vectorized(op, axis):
    """Every packing transposition (input, gradient, weights into channel blocks) runs as
    vectors over the block's channels: a scalar loop made them a quarter of some kernels."""
    pytest.importorskip("tvm")
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.tirx import ForKind

    from tvm_rbn.build.target import host_family
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.schedules.x86 import backward as bw
    from tvm_rbn.schedules.x86 import common as cm
    from tvm_rbn.schedules.x86 import conv as cv

    common = dict(n=4, c=32, h=8, w=8, k=64, r=3, s=3, stride=(1, 1), padding=(1, 1), dtype="float32")
    family = host_family()
    if op == "conv2d_fused":
        func = te.create_prim_func(KernelSpec.make(op, prologue_relu=True, stats=True, **common).build_args())
        sch = cv.schedule_conv(Schedule(func), family)
    elif op == "conv2d_dgrad":
        func = te.create_prim_func(KernelSpec.make(op, grad_prologue=True, epilogue_relu=True, **common).build_args())
        sch = bw.schedule_dgrad(Schedule(func), family)
    else:
        func = te.create_prim_func(KernelSpec.make(op, grad_prologue=True, prologue_relu=True, **common).build_args())
        candidates = bw.wgrad_knob_candidates(bw.wgrad_shape(Schedule(func), family))
        sch = bw.schedule_wgrad(Schedule(func), family, next(kn for kn in candidates if kn.vector_axis == axis))
    stages = {name: block for name, block in cm.blocks(sch).items() if name in PACKING_STAGES}
    assert stages, f"{op}: no packing stage among {sorted(cm.blocks(sch))}"
    for name, block in stages.items():
        inner = sch.get(sch.get_loops(block)[-1])
        assert inner.kind == ForKind.VECTORIZED, f"{op} {name}: innermost loop is {inner.kind}, not vectorized"


# resnet-like layers at batch 16: (C, K, H=W, R, stride)
TILE_LAYERS = [(64, 64, 56, 3, 1), (64, 256, 56, 1, 1), (256, 64, 56, 1, 1), (128, 128, 28, 3, 1),
               (256, 256, 14, 3, 1), (512, 512, 7, 3, 1), (128, 128, 56, 3, 2), (3, 64, 224, 7, 2)]


@pytest.mark.parametrize("family, registers", [("x86-avx512", 32), ("x86-avx2", 16)], ids=["avx512", "avx2"])
@pytest.mark.parametrize("layer", TILE_LAYERS, ids=[f"{c}-{k}-{h}x{h}-{r}x{r}-s{s}" for c, k, h, r, s in TILE_LAYERS])
def test_register_tiles_fit_the_family(layer, family, registers):
    """Default register tiles and every tuning candidate's fit the vector register file with
    room for the weight vectors and the broadcast operand: with AVX2's 16 registers, tiles
    sized for AVX-512's 32 spilled (28x28 3x3 128->128: 56 against 22 ms)."""
    pytest.importorskip("tvm")
    from tvm.s_tir import Schedule

    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.schedules.x86 import backward as bw
    from tvm_rbn.schedules.x86 import common as cm
    from tvm_rbn.schedules.x86 import conv as cv

    c, k, h, r, stride = layer
    geometry = dict(n=16, c=c, h=h, w=h, k=k, r=r, s=r, stride=(stride, stride), padding=(r // 2, r // 2),
                    dtype="float32")
    budget = cv.accumulator_registers(family)
    assert budget == registers - cv.RESERVED_REGISTERS

    def vectors(channels, lanes):
        return max(1, channels // cm.largest_divisor(channels, lanes))

    conv = cv.conv_shape(Schedule(KernelSpec.make("conv2d_fused", prologue_relu=True, stats=True,
                                                  **geometry).prim_func()), family)
    for kn in cv.knob_candidates(conv):
        assert vectors(kn.oc_block, conv.lanes) * kn.ow_block <= budget, f"forward {kn}"
    dgrad = bw.dgrad_shape(Schedule(KernelSpec.make("conv2d_dgrad", grad_prologue=True, epilogue_relu=True,
                                                    **geometry).prim_func()), family)
    for kn in bw.dgrad_knob_candidates(dgrad):
        assert vectors(kn.ic_block, dgrad.lanes) * kn.ow_block <= budget, f"data gradient {kn}"
    wgrad = bw.wgrad_shape(Schedule(KernelSpec.make("conv2d_wgrad", grad_prologue=True, prologue_relu=True,
                                                    **geometry).prim_func()), family)
    for kn in bw.wgrad_knob_candidates(wgrad):
        assert bw.wgrad_tile_registers(kn, wgrad) <= budget, f"weight gradient {kn}"


# (id, H=W, stride, column tile): one tile per row, two (unrolled), four (rows only)
BORDER_CASES = [("one-column-tile", 7, 1, 7), ("two-column-tiles", 8, 1, 4), ("rows-only", 12, 1, 3),
                ("stride2", 9, 2, None)]


@pytest.mark.parametrize("op", ["conv2d_fused", "conv2d_dgrad"], ids=["forward", "dgrad"])
@pytest.mark.parametrize("case", BORDER_CASES, ids=[c[0] for c in BORDER_CASES])
def test_border_taps_skipped_bitwise(op, case, tmp_path):
    """With ``skip_border`` the taps that read a 3x3 pad-1 layer's zero border are predicated
    away (rows always, columns where the column loops unroll), also on a schedule replayed
    from its trace; the outputs are bitwise those of computing them, and the reference's."""
    pytest.importorskip("tvm")
    import tvm
    import tvm_ffi
    from tvm.s_tir import Schedule
    from tvm.tirx import IntImm

    from tvm_rbn.build.target import host_family, host_tvm_target
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.runtime import load_module
    from tvm_rbn.schedules import restore_untraced
    from tvm_rbn.schedules.x86 import backward as bw
    from tvm_rbn.schedules.x86 import common as cm
    from tvm_rbn.schedules.x86 import conv as cv

    _, h, stride, columns = case
    n, c, k = 4, 32, 32
    geometry = dict(n=n, c=c, h=h, w=h, k=k, r=3, s=3, stride=(stride, stride), padding=(1, 1), dtype="float32")
    family = host_family()
    if op == "conv2d_fused":
        spec = KernelSpec.make(op, prologue_relu=True, stats=True, **geometry)
        shape = cv.conv_shape(Schedule(spec.prim_func()), family)
        base = cv.default_knobs(shape)
        schedule, prefix = cv.schedule_conv, "conv"
    else:
        spec = KernelSpec.make(op, grad_prologue=True, epilogue_relu=True, **geometry)
        shape = bw.dgrad_shape(Schedule(spec.prim_func()), family)
        base = bw.default_dgrad_knobs(shape)
        schedule, prefix = bw.schedule_dgrad, "dgrad"
    assert shape.border, f"{op} {case[0]}: padded input without a zero border"
    if columns:
        base = replace(base, ow_block=columns)
    torch.manual_seed(0)
    x, weight = torch.randn(n, c, h, h), torch.randn(k, c, 3, 3) / 17
    co = _coeffs(c, torch.float32)
    p, _ = _out_hw(h, h, 3, stride, 1)
    grad = rbn.DeferredGrad(torch.randn(n, k, p, p), torch.randn(n, k, p, p), torch.rand(k) + 0.5,
                            torch.randn(k) * 0.1, torch.randn(k))
    results = {}
    for skip in (True, False):
        knobs = replace(base, skip_border=skip)
        sch = schedule(Schedule(spec.prim_func()), family, knobs)
        predicates = [sch.get(sch.get_loops(block)[-1]).body.predicate for name, block in cm.blocks(sch).items()
                      if name.startswith(prefix) and name.endswith("_update")]
        predicated = [not (isinstance(pr, IntImm) and pr.value == 1) for pr in predicates]
        assert predicates and any(predicated) == skip, f"{op} {knobs}: updates predicated {predicated}"
        # a trace does not record the predicate: the tuner's replays get it back from the annotation
        replayed = Schedule(spec.prim_func())
        sch.trace.apply_to_schedule(replayed, remove_postproc=False)
        assert tvm_ffi.structural_equal(restore_untraced(replayed.mod["main"]), sch.mod["main"]), \
            f"{op} {knobs}: replayed trace differs after restore_untraced"
        lib = tvm.compile(tvm.IRModule({"k": sch.mod["main"].with_attr("global_symbol", "k")}), target=host_tvm_target())
        lib.export_library(str(tmp_path / f"k{skip}.so"))
        fn = load_module(tmp_path / f"k{skip}.so")["k"]
        if op == "conv2d_fused":
            outs = [torch.zeros(n, k, p, p), torch.zeros(n, k), torch.zeros(n, k)]
            fn(x, co.scale, co.shift, weight, *outs)
        else:
            outs = [torch.zeros(n, c, h, h), torch.zeros(n, c), torch.zeros(n, c)]
            fn(grad.dz, grad.x, grad.c1, grad.c2, grad.c3, weight, x, co.scale, co.shift, co.mean, co.invstd, *outs)
        results[skip] = outs
    for got, computed in zip(results[True], results[False]):
        assert torch.equal(got, computed), f"{op} {case[0]}: max |diff| {(got - computed).abs().max().item():.3e}"
    if op == "conv2d_fused":
        ref = F.conv2d(torch.relu(x * co.scale[:, None, None] + co.shift[:, None, None]), weight, stride=stride, padding=1)
        assert_close(results[True][0], ref, f"y, {case[0]}")
    else:
        ref = ref_convb.conv2d_dgrad(grad, weight, x, co.scale, co.shift, co.mean, co.invstd, (h, h), stride, 1, True)
        assert_close(results[True][0], ref[0], f"dz, {case[0]}")


@pytest.mark.parametrize("layer, skip", [((512, 512, 7, 1, 3), True), ((256, 256, 14, 1, 3), True),
                                         ((128, 128, 28, 1, 3), False), ((128, 32, 14, 1, 3), False),
                                         ((512, 512, 14, 2, 3), False), ((1024, 256, 14, 1, 1), None)],
                         ids=["7x7-512", "14x14-256", "28x28-128", "14x14-128-to-32", "14x14-512-stride2", "1x1"])
def test_border_skip_defaults(layer, skip):
    """Border taps are skipped by default where that measured faster (stride 1, small planes,
    many reduced channels) and computed elsewhere; the tuner gets both choices. A 1x1 layer
    without padding has no border (its padding stage keeps the if_then_else form with a
    condition always true) and no choice to make (skip=None)."""
    pytest.importorskip("tvm")
    from tvm.s_tir import Schedule

    from tvm_rbn.build.target import host_family
    from tvm_rbn.kernels import KernelSpec
    from tvm_rbn.schedules.x86 import backward as bw
    from tvm_rbn.schedules.x86 import conv as cv

    c, k, h, stride, r = layer
    geometry = dict(n=16, c=c, h=h, w=h, k=k, r=r, s=r, stride=(stride, stride), padding=(r // 2, r // 2),
                    dtype="float32")
    family = host_family()
    conv = cv.conv_shape(Schedule(KernelSpec.make("conv2d_fused", prologue_relu=True, stats=True,
                                                  **geometry).prim_func()), family)
    # the data gradient reduces over K and writes C: the same layer read the other way
    dgrad = bw.dgrad_shape(Schedule(KernelSpec.make("conv2d_dgrad", grad_prologue=True, epilogue_relu=True,
                                                    **dict(geometry, c=k, k=c)).prim_func()), family)
    for what, shape, default, candidates in (
            ("forward", conv, cv.default_knobs(conv), cv.knob_candidates(conv)),
            ("data gradient", dgrad, bw.default_dgrad_knobs(dgrad), bw.dgrad_knob_candidates(dgrad))):
        assert shape.border == (skip is not None), f"{what} {layer}: border {shape.border}"
        assert default.skip_border == bool(skip), f"{what} {layer}: default skip_border {default.skip_border}"
        choices = {True, False} if skip is not None else {False}
        assert {kn.skip_border for kn in candidates} == choices, f"{what} {layer}: skip_border among candidates"
