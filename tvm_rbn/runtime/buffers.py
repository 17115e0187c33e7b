"""Recycled CPU memory for the kernels' large outputs.

glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings, and each
page of a fresh mapping faults on its first write: about 10 ms per 51 MB on these machines,
paid again every training step for every large activation and gradient (about 190 ms of the
kernels' time in a 1.5 s resnet50 step at batch 16, 224x224). The pool keeps the memory of
each large output it hands out and hands it out again once the tensor's storage is freed, as
Inductor reuses its buffers and PyTorch's CUDA allocator caches its blocks.

A block is a numpy byte array that the pool keeps; a tensor on it is made with
``torch.frombuffer``, whose storage holds a reference to the array until the storage is freed.
So the block is free again exactly when the array's only references are the pool's; the
tensor's storage has no other owner, so autograd may still accumulate into it in place.

Only CPU tensors of at least MIN_BYTES. A request takes the smallest idle block that holds it
and is at most FIT times its size (a training step repeats its shapes; DenseNet's differ by a
few channels from layer to layer). The pool keeps what a step needs: blocks are not released
while the pool holds less than HEADROOM times the most bytes its blocks were in use at once
(at a miss), since blocks held for the peak of each size together exceed that peak: a
resnet50 step at batch 16, 224x224 needs 1.41 GB of blocks for a high-water mark of 1.10 GB,
and capping the pool at its high-water mark cost 40 misses (0.47 GB of fresh pages) per
step. Past HEADROOM, idle blocks go least recently used first (``TVM_RBN_BUFFER_HEADROOM=1``
trades those misses for the smaller heap). Blocks idle for IDLE_SECONDS are released at the
next miss; ``clear()`` releases every idle block now. ``TVM_RBN_BUFFER_POOL=0`` turns the pool
off (plain ``torch.empty``).
What the pool keeps counts in ``benchmarks.memory`` (malloc'd, like any tensor).

``TVM_RBN_BUFFER_GUARD=1`` (a check, not for speed) maps each block on its own, its data
ending within ALIGNMENT bytes of a page that cannot be accessed (``guarded_array``): a kernel that reads or
writes past the end of a pooled tensor faults there and then, instead of touching whatever
memory follows. With ``MIN_BYTES`` lowered, a training step checks every kernel it runs at the
model's real shapes and tuned schedules (``tests/test_memory_bounds.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import sys
import threading
import time

import numpy as np
import torch

MIN_BYTES = 1 << 20
FIT = 1.3
HEADROOM = 2.0  # default of TVM_RBN_BUFFER_HEADROOM
IDLE_SECONDS = 60.0
ALIGNMENT = 64  # bytes, as torch's CPU allocator (and the kernels' buffers) expect

_lock = threading.Lock()


class PoolState:
    """The pool's blocks by size; its high-water mark, the most bytes of blocks in use at once
    (at a miss) plus the block asked for; and how many blocks it has created (its misses).

    headroom: this pool's own limit (None: ``TVM_RBN_BUFFER_HEADROOM``, else HEADROOM);
    enabled=False serves every request with ``torch.empty`` (as ``TVM_RBN_BUFFER_POOL=0``)."""

    def __init__(self, headroom: float | None = None, enabled: bool = True):
        if headroom is not None and not headroom >= 1:
            raise ValueError(f"headroom={headroom!r}: expected a number >= 1")
        self.headroom = headroom
        self.enabled = enabled
        self.blocks: dict[int, list["_Block"]] = {}
        self.high_water = 0
        self.created = 0

    def held(self) -> int:
        return sum(b.nbytes for bs in self.blocks.values() for b in bs)


_state = PoolState()


@contextlib.contextmanager
def using(state: PoolState):
    """Serve requests from `state` inside the block (A/B benchmarks give each side its own)."""
    global _state
    with _lock:
        outer, _state = _state, state
    try:
        yield state
    finally:
        with _lock:
            _state = outer


class _Block:
    __slots__ = ("array", "nbytes", "offset", "last_used")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        if guarded():
            self.array, self.offset = guarded_array(nbytes)
        else:
            self.array = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
            self.offset = -self.array.ctypes.data % ALIGNMENT
        self.last_used = time.monotonic()

    def idle(self) -> bool:
        # references to the array: this block's and getrefcount's argument, plus one per
        # live storage made on it
        return sys.getrefcount(self.array) == 2

    def tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.frombuffer(self.array, dtype=dtype, count=math.prod(shape), offset=self.offset)
        # `flat`'s storage under the requested shape, as a tensor of its own: not a view of
        # `flat` and without a Python storage object, either of which would hold the storage
        # and keep autograd from accumulating gradients into the tensor in place
        return torch.empty(0, dtype=dtype).set_(flat, flat.storage_offset(), shape, _contiguous_strides(shape))


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def enabled() -> bool:
    return os.environ.get("TVM_RBN_BUFFER_POOL", "1") != "0"


def headroom() -> float:
    raw = os.environ.get("TVM_RBN_BUFFER_HEADROOM")
    if raw is None:
        return HEADROOM
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 1:
        raise ValueError(f"TVM_RBN_BUFFER_HEADROOM={raw!r}: expected a number >= 1 (the most the output pool "
                         "holds, as a multiple of the most its blocks were in use at once)")
    return value


def guarded() -> bool:
    return os.environ.get("TVM_RBN_BUFFER_GUARD", "0") == "1"


def guarded_array(nbytes: int, at: str = "end") -> tuple[np.ndarray, int]:
    """(array over a fresh mapping between two pages that cannot be accessed, offset of
    `nbytes` of data in it): the data ends within ALIGNMENT bytes of the page after it
    (at="end") or starts right after the page before it (at="start"), ALIGNMENT-aligned
    either way. The array keeps the mapping alive."""
    page = mmap.PAGESIZE
    pages = -(-nbytes // page)
    array = np.frombuffer(mmap.mmap(-1, (pages + 2) * page), dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    for guard in (0, pages + 1):
        if libc.mprotect(ctypes.c_void_p(array.ctypes.data + guard * page), page, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
    offset = page if at == "start" else ((pages + 1) * page - nbytes) // ALIGNMENT * ALIGNMENT
    return array, offset


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized contiguous tensor, on recycled memory when it is a large CPU one."""
    shape = tuple(int(d) for d in shape)
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < max(MIN_BYTES, 1) or not enabled() or not _state.enabled:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        now = time.monotonic()
        pool = _state.blocks
        fit = 1.0 if guarded() else FIT  # a guarded tensor ends where its block does
        fits = [b for size, bs in pool.items() if nbytes <= size <= nbytes * fit for b in bs if b.idle()]
        block = min(fits, key=lambda b: b.nbytes) if fits else None
        if block is None:
            _release_idle(now - IDLE_SECONDS)
            blocks = [b for bs in pool.values() for b in bs]
            idle = sorted((b for b in blocks if b.idle()), key=lambda b: b.last_used)
            held = sum(b.nbytes for b in blocks)
            _state.high_water = max(_state.high_water, held - sum(b.nbytes for b in idle) + nbytes)
            limit = (_state.headroom or headroom()) * _state.high_water
            for old in idle:
                if held + nbytes <= limit:
                    break
                pool[old.nbytes].remove(old)
                held -= old.nbytes
            block = _Block(nbytes)
            pool.setdefault(nbytes, []).append(block)
            _state.created += 1
        block.last_used = now
        return block.tensor(shape, dtype)


def empty_like(t: torch.Tensor, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``empty`` with `t`'s dtype and device (and shape, unless given)."""
    return empty(t.shape if shape is None else shape, dtype or t.dtype, t.device)


def _release_idle(before: float) -> None:
    pool = _state.blocks
    for nbytes in list(pool):
        kept = [b for b in pool[nbytes] if b.last_used >= before or not b.idle()]
        if kept:
            pool[nbytes] = kept
        else:
            del pool[nbytes]


def clear() -> None:
    """Release every block that no tensor uses (the ones in use stay with their tensors)."""
    with _lock:
        _release_idle(float("inf"))


def pooled_bytes() -> dict[str, int]:
    """Bytes the pool holds: {"in_use": ..., "idle": ...}."""
    with _lock:
        idle = sum(b.nbytes for bs in _state.blocks.values() for b in bs if b.idle())
        return {"in_use": _state.held() - idle, "idle": idle}
