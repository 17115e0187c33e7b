"""The output pool (tvm_rbn.runtime.buffers): memory is handed out again only once no tensor
uses it, autograd still accumulates into pooled gradients in place, and training with every
output pooled gives bit-identical results to training without the pool."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn
from tvm_rbn.models import MODELS
from tvm_rbn.runtime import buffers

BIG = (512, 1024)  # 2 MiB of fp32: above MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setenv("TVM_RBN_BUFFER_POOL", "1")
    buffers.clear()
    yield
    buffers.clear()


def test_freed_memory_is_reused_and_live_memory_never_is():
    a = buffers.empty(BIG, torch.float32)
    b = buffers.empty(BIG, torch.float32)
    assert a.data_ptr() != b.data_ptr()
    assert a.data_ptr() % buffers.ALIGNMENT == 0 and b.data_ptr() % buffers.ALIGNMENT == 0
    assert a.is_contiguous() and a.shape == BIG and a._base is None
    freed = a.data_ptr()
    del a
    c = buffers.empty(BIG, torch.float32)
    assert c.data_ptr() == freed


@pytest.mark.parametrize("holder", ["view", "saved-for-backward", "numpy"])
def test_memory_held_through_another_tensor_is_not_reused(holder):
    a = buffers.empty(BIG, torch.float32).fill_(1.0)
    kept = {"view": lambda t: t[1:], "numpy": lambda t: t.numpy(),
            "saved-for-backward": lambda t: t * torch.ones(1, requires_grad=True)}[holder](a)
    ptr = a.data_ptr()
    del a
    b = buffers.empty(BIG, torch.float32)
    assert b.data_ptr() != ptr, f"memory still reachable through a {holder} was handed out again"
    del kept


@pytest.mark.parametrize("ratio, reused", [(1.25, True), (1.5, False)], ids=["within-fit", "too-large"])
def test_an_idle_block_serves_a_smaller_request_within_fit(ratio, reused):
    assert 1.25 <= buffers.FIT < 1.5
    rows = BIG[0]
    big = buffers.empty((round(rows * ratio), BIG[1]), torch.float32)
    ptr = big.data_ptr()
    del big
    small = buffers.empty(BIG, torch.float32)
    assert (small.data_ptr() == ptr) is reused
    assert small.shape == BIG and small.is_contiguous()


def _two_phase_step() -> list[int]:
    """Three blocks of one size in use at once, then three of twice that size: sizes whose
    peaks come at different times, as a step's activations and gradients of other shapes."""
    ptrs = []
    for rows in (BIG[0], 2 * BIG[0]):
        held = [buffers.empty((rows, BIG[1]), torch.float32) for _ in range(3)]
        ptrs += [t.data_ptr() for t in held]
        del held
    return ptrs


def test_a_repeated_step_allocates_nothing_after_the_first():
    """The blocks of both sizes are kept, so the second step reuses every one. A pool capped
    at its high-water mark would drop one size's blocks for the other's."""
    first = _two_phase_step()
    held = buffers.pooled_bytes()
    assert _two_phase_step() == first
    assert buffers.pooled_bytes() == held


def test_the_pool_holds_at_most_headroom_times_its_high_water_mark():
    sizes = [BIG[0] + 64 * i for i in range(40)]  # each more than FIT apart from the next few
    for rows in sizes[::3] * 2:
        t = buffers.empty((rows, BIG[1]), torch.float32)
        in_use = t.numel() * t.element_size()
        del t
        held = buffers.pooled_bytes()
        assert held["in_use"] == 0
        assert held["idle"] <= buffers.HEADROOM * buffers._state.high_water
    assert buffers._state.high_water >= in_use


def test_a_separate_pool_state_neither_sees_nor_lends_the_outer_blocks():
    outer = buffers.empty(BIG, torch.float32)
    outer_ptr = outer.data_ptr()
    del outer
    with buffers.using(buffers.PoolState()) as state:
        inner = buffers.empty(BIG, torch.float32)
        assert inner.data_ptr() != outer_ptr and state.created == 1
        del inner
        buffers.empty(BIG, torch.float32)
        assert state.created == 1 and state.held() == BIG[0] * BIG[1] * 4
    assert buffers.empty(BIG, torch.float32).data_ptr() == outer_ptr


def test_a_pool_state_carries_its_own_headroom_and_switch():
    with buffers.using(buffers.PoolState(headroom=1.0)) as capped:
        _two_phase_step()
        _two_phase_step()
        assert capped.held() <= capped.high_water
    with buffers.using(buffers.PoolState(enabled=False)) as off:
        buffers.empty(BIG, torch.float32)
        assert off.created == off.held() == 0
    with pytest.raises(ValueError, match="headroom=0.5"):
        buffers.PoolState(headroom=0.5)


def test_headroom_from_the_environment(monkeypatch):
    monkeypatch.setenv("TVM_RBN_BUFFER_HEADROOM", "1")
    _two_phase_step()
    _two_phase_step()
    assert buffers.pooled_bytes()["idle"] <= buffers._state.high_water  # capped at the high-water mark
    for bad in ("0.5", "two"):
        monkeypatch.setenv("TVM_RBN_BUFFER_HEADROOM", bad)
        with pytest.raises(ValueError, match="TVM_RBN_BUFFER_HEADROOM"):
            buffers.empty((4 * BIG[0], BIG[1]), torch.float32)


def test_small_cuda_or_disabled_requests_bypass_the_pool(monkeypatch):
    small = buffers.empty((16, 16), torch.float32)
    assert buffers.pooled_bytes() == {"in_use": 0, "idle": 0}
    monkeypatch.setenv("TVM_RBN_BUFFER_POOL", "0")
    big = buffers.empty(BIG, torch.float32)
    assert buffers.pooled_bytes() == {"in_use": 0, "idle": 0}
    assert small.shape == (16, 16) and big.shape == BIG


def test_empty_tensors_bypass_the_pool_even_without_a_threshold(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    assert buffers.empty((0, 8), torch.float32).shape == (0, 8)
    assert buffers.pooled_bytes() == {"in_use": 0, "idle": 0}


def test_clear_releases_idle_blocks_only():
    a = buffers.empty(BIG, torch.float32)
    b = buffers.empty(BIG, torch.float64)
    del b
    buffers.clear()
    held = buffers.pooled_bytes()
    assert held["idle"] == 0 and held["in_use"] >= a.numel() * a.element_size()


def test_autograd_accumulates_into_a_pooled_gradient_in_place():
    """A tensor the pool handed out is owned by its storage alone, so autograd's in-place
    accumulation (which checks that) still applies: no extra out-of-place add per fan-out."""
    pooled = []

    class Copy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            out = buffers.empty_like(g).copy_(g)
            pooled.append(out.data_ptr())
            return out

    x = torch.randn(BIG, requires_grad=True)
    y = x * 1
    summed = []
    y.register_hook(lambda g: summed.append(g.data_ptr()))
    (Copy.apply(y) + Copy.apply(y)).sum().backward()
    assert summed[0] in pooled


def test_training_with_every_output_pooled_is_bit_identical(monkeypatch):
    """resnet18 steps with the threshold at 0 (every kernel output pooled, so blocks are reused
    within and across steps) against the same steps without the pool."""
    torch.manual_seed(0)
    base = MODELS["resnet18"](num_classes=10)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    results = {}
    for mode in ("pooled", "plain"):
        monkeypatch.setenv("TVM_RBN_BUFFER_POOL", "1" if mode == "pooled" else "0")
        monkeypatch.setattr(buffers, "MIN_BYTES", 0)
        model = tvm_rbn.restructure(copy.deepcopy(base).train())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, target in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), target).backward()
            opt.step()
        results[mode] = model.state_dict()
        if mode == "pooled":
            assert sum(buffers.pooled_bytes().values()) > 0
    for name, value in results["plain"].items():
        assert torch.equal(results["pooled"][name], value), (
            f"{name}: max |diff| {(results['pooled'][name].double() - value.double()).abs().max().item():.3e}")
