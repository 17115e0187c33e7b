"""Backward fused sub-layers: each kernel against its reference, chains against torch autograd."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn.functional as rbn
from tvm_rbn._checks import InputError
from tvm_rbn.ops.reference import bn_backward as ref_bnb
from tvm_rbn.ops.reference import conv2d_bn_backward as ref_convb

from conftest import assert_close

# ----------------------------------------------------------------------------------------------
# Kernels against their references

# (id, N, C, H, W, K, (R, S), stride, padding): forward geometry of the convolution
GEOMETRIES = {
    "3x3-pad1": (2, 20, 9, 9, 24, (3, 3), 1, 1),
    "3x3-stride2-uncovered-row": (2, 12, 10, 9, 8, (3, 3), 2, 0),  # (10-3) % 2 == 1: input row 9 unread
    "7x7-stride2-pad3": (1, 3, 16, 16, 10, (7, 7), 2, 3),
    "1x1-stride2-odd7": (3, 16, 7, 7, 20, (1, 1), 2, 0),
    "2x3-stride3x2-pad0x1": (1, 5, 8, 7, 6, (2, 3), (3, 2), (0, 1)),
    "1x1-batch1": (1, 17, 5, 6, 9, (1, 1), 1, 0),
    "3x3-stride2-pad1-even": (2, 16, 8, 8, 12, (3, 3), 2, 1),  # W % sw == 0: output columns by phase
    "1x1-stride2-even": (2, 16, 8, 8, 20, (1, 1), 2, 0),
}

# (geometry, grad prologue, epilogue / act prologue: None, relu, no-relu, dtype): every flag
# value meets several geometries without building the full cross product.
DGRAD_CASES = [
    ("3x3-pad1", False, None, torch.float32),
    ("3x3-pad1", True, True, torch.float32),
    ("3x3-stride2-uncovered-row", True, True, torch.float32),
    ("7x7-stride2-pad3", False, False, torch.float32),
    ("1x1-stride2-odd7", True, None, torch.float32),
    ("2x3-stride3x2-pad0x1", False, True, torch.float32),
    ("1x1-batch1", True, False, torch.float64),
    ("3x3-stride2-uncovered-row", False, None, torch.float64),
    ("3x3-stride2-pad1-even", True, True, torch.float32),
    ("3x3-stride2-pad1-even", False, False, torch.float64),
    ("1x1-stride2-even", True, True, torch.float32),
]
WGRAD_CASES = [
    ("3x3-pad1", False, None, torch.float32),
    ("3x3-pad1", True, True, torch.float32),
    ("3x3-stride2-uncovered-row", True, False, torch.float32),
    ("7x7-stride2-pad3", False, None, torch.float32),
    ("1x1-stride2-odd7", True, True, torch.float32),
    ("1x1-stride2-odd7", False, None, torch.float32),  # the subsampled operand, plain (a downsample)
    ("2x3-stride3x2-pad0x1", False, True, torch.float32),
    ("1x1-batch1", True, None, torch.float64),
    ("3x3-stride2-uncovered-row", False, True, torch.float64),
]

_FLAG = {None: "plain", True: "relu", False: "no-relu"}
_DT = {torch.float32: "fp32", torch.float64: "fp64"}


def _case_id(case):
    geometry, prologue, flag, dtype = case
    return f"{geometry}-{'grad-prologue' if prologue else 'grad'}-{_FLAG[flag]}-{_DT[dtype]}"


def _out_hw(h, w, rs, stride, padding):
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    return (h + 2 * ph - rs[0]) // sh + 1, (w + 2 * pw - rs[1]) // sw + 1


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _channel(c, dtype, lo=None):
    return (torch.rand(c, dtype=dtype) + lo) if lo is not None else torch.randn(c, dtype=dtype)


def _grad(prologue, n, k, p, q, dtype):
    """A plain gradient, or the operands of the grad prologue as a DeferredGrad."""
    if not prologue:
        return torch.randn(n, k, p, q, dtype=dtype)
    return rbn.DeferredGrad(
        torch.randn(n, k, p, q, dtype=dtype), torch.randn(n, k, p, q, dtype=dtype) * 2 + 1,
        _channel(k, dtype, 0.5), _channel(k, dtype) * 0.1, _channel(k, dtype),
    )


def _coeffs(c, dtype):
    """Forward BatchNorm coefficients; shift < 0 for some channels so the ReLU mask matters."""
    invstd = _channel(c, dtype, 0.5)
    return rbn.BNCoefficients(invstd * _channel(c, dtype, 0.5), _channel(c, dtype) - 0.3, _channel(c, dtype), invstd)


def _dgrad_operands(geometry, prologue, dtype):
    """The geometry's numbers, then a weight and the gradient at the conv output."""
    n, c, h, w, k, rs, stride, padding = GEOMETRIES[geometry]
    p, q = _out_hw(h, w, rs, stride, padding)
    return (n, c, h, w, stride, padding), torch.randn(k, c, *rs, dtype=dtype), _grad(prologue, n, k, p, q, dtype)


@pytest.mark.parametrize("case", DGRAD_CASES, ids=[_case_id(c) for c in DGRAD_CASES])
def test_dgrad_kernel_matches_reference(case):
    geometry, prologue, epilogue, dtype = case
    (n, c, h, w, stride, padding), weight, grad = _dgrad_operands(geometry, prologue, dtype)
    if epilogue is None:
        got = rbn.conv2d_dgrad(grad, weight, (h, w), stride, padding)
        expected = ref_convb.conv2d_dgrad(grad, weight, None, None, None, None, None, (h, w), stride, padding, None)
        assert_close(got, expected, "da")
        return
    x_raw = torch.randn(n, c, h, w, dtype=dtype)
    co = _coeffs(c, dtype)
    dz, tile_dbeta, tile_dgamma = rbn.conv2d_dgrad_bn_relu(grad, weight, x_raw, co, stride, padding, relu=epilogue)
    ref_dz, ref_dbeta, ref_dgamma = ref_convb.conv2d_dgrad(
        grad, weight, x_raw, co.scale, co.shift, co.mean, co.invstd, (h, w), stride, padding, epilogue
    )
    if epilogue:
        assert bool((ref_dz == 0).any()) and bool((ref_dz != 0).any()), "test data must exercise the ReLU mask"
    assert_close(dz, ref_dz, "dz")
    plane = float(ref_dz.abs().sum() / (n * c))  # a plane sum's error scales with its terms
    assert_close(tile_dbeta, ref_dbeta, "tile_dbeta", scale=plane)
    assert_close(tile_dgamma, ref_dgamma, "tile_dgamma", scale=plane * 4)


# (geometry, grad prologue, dtype): the running-sum output, reading and writing channel slices
# of block buffers (as a DenseNet block's backward does) or whole tensors
ACCUMULATE_CASES = [
    ("3x3-pad1", True, torch.float32, 32),
    ("1x1-batch1", False, torch.float64, 17),
    ("3x3-stride2-uncovered-row", True, torch.float32, 20),
]


@pytest.mark.parametrize("case", ACCUMULATE_CASES,
                         ids=[f"{g}-{'grad-prologue' if p else 'grad'}-{_DT[d]}-buffer{t}" for g, p, d, t in
                              ACCUMULATE_CASES])
def test_dgrad_running_sum_matches_reference(case):
    """out = accumulate + scale*dz from the epilogue; dz itself is not an output."""
    geometry, prologue, dtype, total = case
    (n, c, h, w, stride, padding), weight, grad = _dgrad_operands(geometry, prologue, dtype)
    x_raw, co = torch.randn(n, c, h, w, dtype=dtype), _coeffs(c, dtype)
    source, target = torch.randn(n, total, h, w, dtype=dtype), torch.full((n, total, h, w), 7.0, dtype=dtype)
    before = source.clone()
    got, tile_dbeta, tile_dgamma = rbn.conv2d_dgrad_bn_relu(
        grad, weight, x_raw, co, stride, padding, accumulate=source[:, :c], out=target[:, :c])
    ref, ref_dbeta, ref_dgamma = ref_convb.conv2d_dgrad(
        grad, weight, x_raw, co.scale, co.shift, co.mean, co.invstd, (h, w), stride, padding, True,
        acc_in=before[:, :c])
    assert got.data_ptr() == target.data_ptr(), "the sum goes where out points"
    assert_close(got, ref, "accumulate + scale*dz")
    plane = float(ref_dbeta.abs().sum() / (n * c)) + 1
    assert_close(tile_dbeta, ref_dbeta, "tile_dbeta", scale=plane)
    assert_close(tile_dgamma, ref_dgamma, "tile_dgamma", scale=plane * 4)
    assert torch.equal(source, before), "accumulate is read only"
    assert bool((target[:, c:] == 7.0).all()), "channels past the slice are untouched"


@pytest.mark.parametrize("case", WGRAD_CASES, ids=[_case_id(c) for c in WGRAD_CASES])
def test_wgrad_kernel_matches_reference(case):
    geometry, prologue, act, dtype = case
    n, c, h, w, k, rs, stride, padding = GEOMETRIES[geometry]
    p, q = _out_hw(h, w, rs, stride, padding)
    grad = _grad(prologue, n, k, p, q, dtype)
    x = torch.randn(n, c, h, w, dtype=dtype)
    if act is None:
        got = rbn.conv2d_wgrad(grad, x, rs, stride, padding)
        expected = ref_convb.conv2d_wgrad(grad, x, None, None, rs, stride, padding, None)
    else:
        co = _coeffs(c, dtype)
        got = rbn.bn_relu_conv2d_wgrad(grad, x, co.scale, co.shift, rs, stride, padding, relu=act)
        expected = ref_convb.conv2d_wgrad(grad, x, co.scale, co.shift, rs, stride, padding, act)
    assert got.shape == (k, c, *rs)
    assert_close(got, expected, "dw")


def test_references_match_autograd():
    """The conv references (torch.nn.grad) against autograd of F.conv2d, padding after ReLU."""
    n, c, h, w, k, rs, stride, padding = GEOMETRIES["3x3-stride2-uncovered-row"]
    dtype = torch.float64
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c, *rs, dtype=dtype, requires_grad=True)
    scale, shift = _channel(c, dtype, 0.5), _channel(c, dtype)
    a = torch.relu(x * scale[:, None, None] + shift[:, None, None]).requires_grad_()
    y = F.conv2d(a, weight, stride=stride, padding=padding)
    g = torch.randn_like(y)
    y.backward(g)
    da = ref_convb.conv2d_dgrad(g, weight.detach(), None, None, None, None, None, (h, w), stride, padding, None)
    dw = ref_convb.conv2d_wgrad(g, x, scale, shift, rs, stride, padding, True)
    assert_close(da, a.grad, "reference da")
    assert_close(dw, weight.grad, "reference dw")
    assert bool((da[:, :, -1, :] == 0).all()), "the uncovered last row gets no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
def test_standalone_stats_kernel_matches_reference(relu, dtype):
    shape = (3, 10, 5, 9)
    da, x_raw = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    co = _coeffs(shape[1], dtype)
    got = rbn.bn_relu_backward_stats(da, x_raw, co, relu=relu)
    expected = ref_bnb.stats(da, x_raw, co.scale, co.shift, co.mean, co.invstd, relu)
    assert_close(got[0], expected[0], "dz")
    assert_close(got[1], expected[1], "tile_dbeta", scale=45.0)
    assert_close(got[2], expected[2], "tile_dgamma", scale=45.0 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_finalize_and_dx_kernels_match_reference(dtype):
    tiles, c, count = 6, 11, 35
    tile_dbeta, tile_dgamma = torch.randn(tiles, c, dtype=dtype) * 5, torch.randn(tiles, c, dtype=dtype) * 5
    co = _coeffs(c, dtype)
    got = rbn.bn_backward_finalize(tile_dbeta, tile_dgamma, count, co)
    expected = ref_bnb.finalize(tile_dbeta, tile_dgamma, count, co.scale, co.mean, co.invstd)
    for name, a, b in zip(rbn.BNGradCoefficients._fields, got, expected):
        assert_close(a, b, name)
    dz, x = torch.randn(tiles, c, 5, 7, dtype=dtype), torch.randn(tiles, c, 5, 7, dtype=dtype)
    assert_close(rbn.bn_backward_dx(dz, x, got), ref_bnb.dx(dz, x, got.c1, got.c2, got.c3), "dx")


def test_finalize_reference_is_batch_norm_backward():
    """dx = c1*dz + c2*x + c3 and dgamma, dbeta against autograd of F.batch_norm."""
    dtype = torch.float64
    x = (torch.randn(4, 6, 5, 5, dtype=dtype) * 3 + 2).requires_grad_()
    gamma, beta = _channel(6, dtype, 0.5).requires_grad_(), _channel(6, dtype).requires_grad_()
    z = F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)
    dz = torch.randn_like(z)
    z.backward(dz)
    xd = x.detach()
    mean = xd.mean((0, 2, 3))
    invstd = (xd.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    _, tile_dbeta, tile_dgamma = ref_bnb.stats(dz, xd, None, None, mean, invstd, False)
    dgamma, dbeta, c1, c2, c3 = ref_bnb.finalize(tile_dbeta, tile_dgamma, 25, gamma.detach() * invstd, mean, invstd)
    assert_close(dgamma, gamma.grad, "dgamma")
    assert_close(dbeta, beta.grad, "dbeta")
    assert_close(ref_bnb.dx(dz, xd, c1, c2, c3), x.grad, "dx")


# ----------------------------------------------------------------------------------------------
# Chains against torch autograd: conv1 -> bn1 [-> relu] -> conv2 -> bn2 [-> relu] -> out


class Chain:
    """Parameters and the PyTorch and restructured computations of one chain."""

    def __init__(self, n, c0, c1, c2, hw, conv1, conv2, relu1=True, relu2=True, dtype=torch.float32):
        (k1, self.s1, self.p1), (k2, self.s2, self.p2) = conv1, conv2
        self.k1, self.k2, self.relu1, self.relu2 = k1, k2, relu1, relu2
        self.x0 = torch.randn(n, c0, *_pair(hw), dtype=dtype)
        self.w1 = torch.randn(c1, c0, k1, k1, dtype=dtype) / (c0 * k1 * k1) ** 0.5
        self.w2 = torch.randn(c2, c1, k2, k2, dtype=dtype) / (c1 * k2 * k2) ** 0.5
        self.g1, self.b1 = _channel(c1, dtype, 0.5), _channel(c1, dtype) * 0.5
        self.g2, self.b2 = _channel(c2, dtype, 0.5), _channel(c2, dtype) * 0.5

    @property
    def params(self):
        return [self.x0, self.w1, self.g1, self.b1, self.w2, self.g2, self.b2]

    def torch_forward(self, x0, w1, g1, b1, w2, g2, b2, keep=None):
        y1 = F.conv2d(x0, w1, stride=self.s1, padding=self.p1)
        a1 = F.batch_norm(y1, None, None, g1, b1, training=True)
        a1 = torch.relu(a1) if self.relu1 else a1
        y2 = F.conv2d(a1, w2, stride=self.s2, padding=self.p2)
        if keep is not None:
            y2.retain_grad()
            keep.append(y2)
        out = F.batch_norm(y2, None, None, g2, b2, training=True)
        return torch.relu(out) if self.relu2 else out

    def forward(self, x0, w1, g1, b1, w2, g2, b2):
        """Restructured forward; returns out and what backward keeps."""
        y1, s1, m1 = rbn.conv2d_stats(x0, w1, self.s1, self.p1)
        bn1 = rbn.bn_finalize(s1, m1, rbn.tile_count(y1), g1, b1)
        y2, s2, m2 = rbn.bn_relu_conv2d_stats(y1, bn1.scale, bn1.shift, w2, self.s2, self.p2, relu=self.relu1)
        bn2 = rbn.bn_finalize(s2, m2, rbn.tile_count(y2), g2, b2)
        out = rbn.bn_relu(y2, bn2.scale, bn2.shift, relu=self.relu2)
        return out, (x0, w1, w2, y1, bn1, y2, bn2)

    def backward(self, dout, saved, need_dx0=True):
        """Restructured backward: (dx0, dw1, dgamma1, dbeta1, dw2, dgamma2, dbeta2), and the
        materialized gradient at y2 (the standalone dx kernel) for checking."""
        x0, w1, w2, y1, bn1, y2, bn2 = saved
        dz2, tb2, tg2 = rbn.bn_relu_backward_stats(dout, y2, bn2, relu=self.relu2)
        gc2 = rbn.bn_backward_finalize(tb2, tg2, rbn.tile_count(y2), bn2)
        dy2 = rbn.bn_input_grad(dz2, y2, gc2)
        dw2 = rbn.bn_relu_conv2d_wgrad(dy2, y1, bn1.scale, bn1.shift, self.k2, self.s2, self.p2, relu=self.relu1)
        dz1, tb1, tg1 = rbn.conv2d_dgrad_bn_relu(dy2, w2, y1, bn1, self.s2, self.p2, relu=self.relu1)
        gc1 = rbn.bn_backward_finalize(tb1, tg1, rbn.tile_count(y1), bn1)
        dy1 = rbn.bn_input_grad(dz1, y1, gc1)
        dw1 = rbn.conv2d_wgrad(dy1, x0, self.k1, self.s1, self.p1)
        dx0 = rbn.conv2d_dgrad(dy1, w1, x0.shape, self.s1, self.p1) if need_dx0 else None
        grads = (dx0, dw1, gc1.dgamma, gc1.dbeta, dw2, gc2.dgamma, gc2.dbeta)
        return grads, rbn.bn_backward_dx(dz2, y2, gc2)


GRAD_NAMES = ("x0", "w1", "gamma1", "beta1", "w2", "gamma2", "beta2")

# (id, N, C0, C1, C2, HW, conv1 (k, stride, pad), conv2, relu1, relu2)
CHAINS = [
    ("3x3-pad1-channels20-24", 2, 3, 20, 24, 9, (3, 1, 1), (3, 1, 1), True, True),
    ("stem7x7s2p3-then-3x3s2-batch1", 1, 3, 16, 12, 17, (7, 2, 3), (3, 2, 1), True, True),
    ("1x1-then-1x1s2-odd7-bn1-no-relu", 3, 5, 12, 16, 7, (1, 1, 0), (1, 2, 0), False, True),
    ("3x3-odd7-batch1-end-no-relu", 1, 6, 10, 18, 7, (3, 1, 1), (3, 1, 1), True, False),
    ("1x1-then-3x3s2-uncovered-batch4", 4, 8, 16, 8, (10, 6), (1, 1, 0), (3, 2, 0), True, True),
    ("2x2-to-1x1-spatial-projection", 2, 16, 16, 32, 2, (3, 1, 1), (1, 2, 0), True, True),
    ("1x1-spatial-3x3-pad1", 2, 8, 16, 16, 1, (3, 1, 1), (3, 1, 1), True, True),
]


@pytest.mark.parametrize("case", CHAINS, ids=[c[0] for c in CHAINS])
def test_chain_gradients_match_autograd(case):
    """The restructured fp32 chain against autograd of the same chain in fp64, the exact
    answer, at the fp32 tolerance. (PyTorch's own fp32 result is no oracle here: with oneDNN's
    AVX2 kernels, d w2 of the 1x1-plane case is 5.3e-4 from fp64, ours 7.9e-5.)"""
    chain = Chain(*case[1:])
    leaves = [t.double().requires_grad_() for t in chain.params]
    kept = []
    out_ref = chain.torch_forward(*leaves, keep=kept)
    dout = torch.randn(out_ref.shape)
    out_ref.backward(dout.double())
    with torch.no_grad():
        out, saved = chain.forward(*chain.params)
        grads, dy2 = chain.backward(dout, saved)
    assert_close(out, out_ref.detach().float(), "forward output")
    assert_close(dy2, kept[0].grad.float(), "gradient at conv2 output (standalone dx kernel)")
    for name, got, leaf in zip(GRAD_NAMES, grads, leaves):
        assert_close(got, leaf.grad.float(), f"d loss / d {name}")


def test_uncovered_input_rows_get_zero_gradient():
    """3x3 stride 2, no padding, 8 rows: output rows cover input rows 0..6; row 7 gets 0."""
    weight = torch.randn(4, 3, 3, 3)
    grad = torch.randn(2, 4, 3, 3)
    da = rbn.conv2d_dgrad(grad, weight, (8, 8), stride=2, padding=0)
    assert bool((da[:, :, 7, :] == 0).all()) and bool((da[:, :, :, 7] == 0).all())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    F.conv2d(x, weight, stride=2).backward(grad)
    assert_close(da, x.grad, "da")


def test_backward_is_deterministic():
    """Same inputs, bitwise the same gradients: no atomics, fixed reduction order."""
    chain = Chain(*CHAINS[0][1:])
    with torch.no_grad():
        out, saved = chain.forward(*chain.params)
        dout = torch.randn_like(out)
        first, _ = chain.backward(dout, saved)
        second, _ = chain.backward(dout, saved)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"d {name} differs between runs: max |diff| {(a - b).abs().max().item():.3e}"


# ----------------------------------------------------------------------------------------------
# gradcheck: the kernel composition as a torch.autograd.Function, fp64, tiny shapes

GRADCHECK_CHAINS = [
    ("3x3-then-3x3s2-end-no-relu", 2, 2, 3, 3, 5, (3, 1, 1), (3, 2, 1), True, False),
    ("1x1s2-then-3x3-bn1-no-relu-batch1", 1, 2, 3, 2, 6, (1, 2, 0), (3, 1, 1), False, True),
]


class RestructuredChainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain, *params):
        out, saved = chain.forward(*params)
        ctx.chain, ctx.saved = chain, saved
        return out

    @staticmethod
    def backward(ctx, dout):
        grads, _ = ctx.chain.backward(dout.contiguous(), ctx.saved)
        return (None, *grads)


@pytest.mark.parametrize("case", GRADCHECK_CHAINS, ids=[c[0] for c in GRADCHECK_CHAINS])
def test_gradcheck_fp64(case):
    chain = Chain(*case[1:], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in chain.params]
    assert torch.autograd.gradcheck(lambda *p: RestructuredChainFn.apply(chain, *p), inputs)


# ----------------------------------------------------------------------------------------------
# Validation: problems are named before any kernel runs


@pytest.fixture
def no_kernels(monkeypatch):
    def refuse(spec):
        raise AssertionError(f"a kernel was requested ({spec.op}) before validation finished")

    monkeypatch.setattr(rbn, "kernel", refuse)


_SHARED = torch.randn(2, 6, 5, 5)  # one buffer: two channel slices of it may not be accumulate and out


def _valid_dgrad_args():
    return dict(grad=torch.randn(2, 4, 5, 5), weight=torch.randn(4, 3, 3, 3), x_raw=torch.randn(2, 3, 5, 5),
                coeffs=_coeffs(3, torch.float32), padding=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(grad=torch.randn(2, 4, 4, 4)), "grad has spatial size 4x4"),
        (dict(weight=torch.randn(5, 3, 3, 3)), "grad has 4 channels"),
        (dict(x_raw=torch.randn(2, 6, 5, 5)), "x_raw has shape"),
        (dict(coeffs=(1, 2)), "coeffs must be the BNCoefficients"),
        (dict(coeffs=_coeffs(4, torch.float32)), "coeffs.scale has shape"),
        (dict(grad=torch.randn(2, 4, 5, 5, dtype=torch.float64)), "dtypes differ"),
        (dict(grad=[1.0]), "grad must be a torch.Tensor or a DeferredGrad"),
        (dict(grad=torch.randn(2, 4, 5, 5).requires_grad_()), "grad requires grad"),
        (dict(grad=torch.randn(2, 4, 5, 5).transpose(2, 3)), "grad is not contiguous"),
        (dict(accumulate=torch.randn(2, 3, 5, 4)), "accumulate has shape"),
        (dict(accumulate=torch.randn(2, 3, 5, 5, dtype=torch.float64)), "dtypes differ"),
        (dict(accumulate=torch.randn(2, 3, 5, 5), relu=False), "relu=True only"),
        (dict(accumulate=_SHARED[:, :3], out=_SHARED[:, 3:]), "out shares memory with accumulate"),
        (dict(out=torch.randn(2, 3, 5, 4)), "out has shape"),
    ],
    ids=["grad-size", "weight-channels", "x-raw-channels", "coeffs-type", "coeffs-shape", "dtype-mix",
         "grad-type", "requires-grad", "non-contiguous", "accumulate-shape", "accumulate-dtype",
         "accumulate-without-relu", "accumulate-aliased", "out-shape"],
)
def test_dgrad_validation(change, message, no_kernels):
    args = {**_valid_dgrad_args(), **change}
    with pytest.raises(InputError, match=message):
        rbn.conv2d_dgrad_bn_relu(**args)


def test_other_backward_validation(no_kernels):
    dz, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    co = _coeffs(3, torch.float32)
    with pytest.raises(InputError, match="grad_coeffs must be the BNGradCoefficients"):
        rbn.bn_input_grad(dz, x, (co.scale, co.scale, co.scale))
    gc = rbn.BNGradCoefficients(*(torch.randn(3) for _ in range(5)))
    with pytest.raises(InputError, match="x has shape"):
        rbn.bn_input_grad(dz, torch.randn(2, 3, 4, 5), gc)
    with pytest.raises(InputError, match="kernel_size must be"):
        rbn.conv2d_wgrad(dz, x, (3, 3, 3))
    with pytest.raises(InputError, match="grad has batch 2"):
        rbn.conv2d_wgrad(dz, torch.randn(3, 3, 4, 4), 1)
    with pytest.raises(InputError, match="input_size"):
        rbn.conv2d_dgrad(dz, torch.randn(3, 3, 1, 1), (2, 3, 4))
    with pytest.raises(InputError, match="tile_count must be a positive int"):
        rbn.bn_backward_finalize(torch.randn(2, 3), torch.randn(2, 3), 0, co)
    with pytest.raises(InputError, match="x_raw has shape"):
        rbn.bn_relu_backward_stats(dz, torch.randn(2, 3, 4, 5), co)


def test_backward_chain_benchmark_runs(tmp_path):
    """The benchmark script end to end on a tiny chain: JSON written, gradients agree."""
    from tvm_rbn.benchmarks import backward_chain

    out = tmp_path / "bc.json"
    backward_chain.main(["--n", "1", "--c", "4", "--k", "8", "--hw", "6", "--reps", "10", "--warmup", "1",
                         "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["median_s"]) == {"tvm_rbn", "torch_autograd"}
    assert all(len(ts) == 10 for ts in r["times_s"].values())
    assert r["machine"]["tvm_threads"] >= 1 and r["machine"]["torch_threads"] >= 1
    worst = max(r["max_rel_diff_vs_torch"].values())
    assert worst < 1e-4, f"benchmark gradients differ from torch by {worst:.3e}"
    assert r["saved_for_backward_bytes"]["tvm_rbn"] < r["saved_for_backward_bytes"]["torch_autograd"]
