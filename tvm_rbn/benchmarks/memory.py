"""Peak memory of one training step (forward + backward), restructured vs PyTorch eager.

    python -m tvm_rbn.benchmarks.memory --model densenet121 --batch 16 --size 224 [--dtype float32]
                                        [--steps 2] [--out out/memory_densenet121_b16_224.json]

What is measured: the bytes the process has allocated from the C heap (glibc malloc), read
with ``mallinfo2()`` as ``uordblks + hblkhd`` (in-use bytes of the malloc arenas plus the
large blocks malloc serves by mmap). Every CPU tensor PyTorch allocates comes from there, and
so do TVM's kernel workspaces (its CPU device API allocates with the same malloc) and the
Python objects; code and file mappings do not count. Unlike the resident-set size, the number
falls when memory is freed (malloc keeps freed pages mapped, so RSS would keep a peak from
earlier work), and it counts what TVM allocates, which ``torch.profiler`` would not see.

How: each side runs in a fresh process (so neither inherits the other's allocator state):
build the model (same seed, same weights), the input batch and the targets, load the kernel
library (built beforehand by the parent process, so no compiler runs in the measured process),
then read the baseline B (model, gradients absent, input). Then ``--steps`` training steps
(forward, cross-entropy loss, backward; parameter gradients are set to None between steps;
no optimizer step), while a background thread reads the heap every 0.5 ms; TVM's kernels
release the GIL, so the thread keeps sampling while they run, and samples are also taken right
after each forward and each backward. Reported per side: B, the peak P over all steps, and
P - B: the memory one training step needs beyond the model and its input. The first step
includes one-time allocations of both runtimes (PyTorch's allocator caches, oneDNN
primitives; TVM's per-thread workspace pools, which keep their blocks for later steps), and
P covers every step, so nothing TVM holds on to is missed. The ratio is (P - B) restructured
/ (P - B) eager. Sampling can miss a peak shorter than the sampling interval; the peak of a
training step is the plateau around the end of forward, which lasts far longer.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    """Bytes currently allocated with malloc (arenas and mmapped blocks)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakSampler:
    """Reads heap_in_use() every `interval` seconds on a thread; .peak is the largest seen."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak = heap_in_use()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        now = heap_in_use()
        self.peak = max(self.peak, now)
        self.samples += 1
        return now

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _build(model_name: str, batch: int, size: int, dtype: torch.dtype, num_classes: int):
    from ..models import MODELS

    torch.manual_seed(0)
    model = MODELS[model_name](num_classes=num_classes).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
    target = torch.randint(0, num_classes, (batch,), generator=g)
    return model, x, target


def _child(args) -> dict:
    """One side, in this (fresh) process."""
    dtype = getattr(torch, args.dtype)
    model, x, target = _build(args.model, args.batch, args.size, dtype, args.num_classes)
    if args.side == "tvm_rbn":
        import tvm_rbn
        from ..build import provider

        model = tvm_rbn.restructure(model)
        provider.add_library(args.library)  # built by the parent: no compiler here
    model.train()
    gc.collect()
    baseline = heap_in_use()
    steps = []
    with PeakSampler() as sampler:
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), target)
            after_forward = sampler.sample()
            loss.backward()
            after_backward = sampler.sample()
            del loss
            for p in model.parameters():
                p.grad = None
            gc.collect()
            steps.append({"seconds": time.perf_counter() - start, "after_forward": after_forward,
                          "after_backward": after_backward, "after_step": sampler.sample()})
    return {"baseline_bytes": baseline, "peak_bytes": sampler.peak, "step_peak_bytes": sampler.peak - baseline,
            "samples": sampler.samples, "steps": steps,
            "max_rss_bytes": _max_rss()}  # for reference: includes the libraries and freed-but-kept pages


def _max_rss() -> int:
    """Peak resident set size of this process (VmHWM; getrusage's ru_maxrss would include the
    forked parent's before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _build_library(args) -> str:
    """Build (or find in the cache) one library with every kernel of the restructured step."""
    from ..build import provider
    from ..build.compile import build_cached
    from ..build.workloads import extract

    model, x, _ = _build(args.model, args.batch, args.size, getattr(torch, args.dtype), args.num_classes)
    specs = [spec for spec, _ in extract(model, tuple(x.shape), dtype=x.dtype)]
    start = time.perf_counter()
    path = build_cached(specs, provider.tuning_logs())
    print(f"kernel library: {len(specs)} kernels, {time.perf_counter() - start:.0f} s (cached: {path})", flush=True)
    return str(path)


def _run_side(side: str, args, library: str | None) -> dict:
    cmd = [sys.executable, "-m", "tvm_rbn.benchmarks.memory", "--child", side, "--model", args.model,
           "--batch", str(args.batch), "--size", str(args.size), "--dtype", args.dtype, "--steps", str(args.steps),
           "--num-classes", str(args.num_classes)]
    if library:
        cmd += ["--library", library]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=["eager", "tvm_rbn"], help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.side = args.child
        print(json.dumps(_child(args)))
        return {}

    from .timing import machine, save_json

    library = _build_library(args)
    sides = {}
    for side in ("eager", "tvm_rbn"):
        print(f"measuring {side} ...", flush=True)
        sides[side] = _run_side(side, args, library if side == "tvm_rbn" else None)
    ratio = sides["tvm_rbn"]["step_peak_bytes"] / sides["eager"]["step_peak_bytes"]
    print(f"\n{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {args.steps} training step(s) "
          "(forward + backward), heap in use (MiB):")
    print(f"{'side':10} {'baseline':>9} {'peak':>9} {'peak-base':>9} {'max RSS':>9}  seconds per step")
    for side, r in sides.items():
        secs = ", ".join(f"{s['seconds']:.1f}" for s in r["steps"])
        print(f"{side:10} {_mib(r['baseline_bytes'])} {_mib(r['peak_bytes'])} {_mib(r['step_peak_bytes'])} "
              f"{_mib(r['max_rss_bytes'])}  {secs}")
    print(f"step peak, restructured / eager: {ratio:.3f}")
    payload = {"model": args.model, "batch": args.batch, "size": args.size, "dtype": args.dtype, "steps": args.steps,
               "num_classes": args.num_classes, "method": "mallinfo2 uordblks+hblkhd, fresh process per side, "
               "0.5 ms sampling thread plus samples after each forward and backward",
               "machine": machine(), "sides": sides, "step_peak_ratio": ratio}
    out = args.out or f"out/memory_{args.model}_b{args.batch}_{args.size}.json"
    print(f"saved {save_json(out, payload)}")
    return payload


if __name__ == "__main__":
    main()
