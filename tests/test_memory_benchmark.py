"""The memory benchmark's measuring instrument (tvm_rbn.benchmarks.memory): heap bytes in use
follow allocations and frees, and the sampler catches a peak that is gone when it stops."""
from __future__ import annotations

import time

import torch

from tvm_rbn.benchmarks.memory import PeakSampler, heap_in_use


def test_heap_in_use_tracks_tensors_and_the_sampler_keeps_the_peak():
    before = heap_in_use()
    with PeakSampler() as sampler:
        big = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        time.sleep(0.02)
        during = heap_in_use()
        del big
        time.sleep(0.02)
    after = heap_in_use()
    assert during - before >= 16 * 2**20
    assert after - before < 4 * 2**20
    assert sampler.peak - before >= 16 * 2**20
    assert sampler.samples > 5
