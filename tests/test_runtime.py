"""Build cache, library loading without the compiler, and the thread count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import tvm_rbn
import tvm_rbn.functional as rbn
from tvm_rbn.build import cache
from tvm_rbn.build.compile import build_cached
from tvm_rbn.kernels import KernelSpec


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_tvm_threads_match_torch():
    assert tvm_rbn.num_threads() == torch.get_num_threads()


def test_cached_kernels_run_without_the_compiler():
    """A second process finds the built kernel on disk and never imports tvm."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    rbn.conv2d_stats(x, w, padding=1)  # builds into this session's cache
    result = _run(
        """
        import sys
        sys.modules["tvm"] = None  # any `import tvm` now raises ImportError
        import torch, tvm_rbn.functional as rbn, torch.nn.functional as F
        x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        y, s, m2 = rbn.conv2d_stats(x, w, padding=1)
        print((y - F.conv2d(x, w, padding=1)).abs().max().item())
        print(sorted(m for m, mod in sys.modules.items() if mod is not None and (m == "tvm" or m.startswith("tvm."))))
        """
    )
    assert result.returncode == 0, result.stderr
    diff, modules = result.stdout.strip().splitlines()
    assert float(diff) < 1e-4
    assert modules == "[]"


def test_cache_entry_reused_and_manifest():
    spec = KernelSpec.make("bn_eval_coeffs", channels=11, dtype="float32")
    entry = build_cached([spec])
    stamp = (entry / cache.LIBRARY_FILE).stat().st_mtime_ns
    assert build_cached([spec]) == entry
    assert (entry / cache.LIBRARY_FILE).stat().st_mtime_ns == stamp
    manifest = json.loads((entry / cache.MANIFEST_FILE).read_text())
    assert [k["symbol"] for k in manifest["kernels"]] == [spec.symbol]
    assert manifest["versions"]["apache-tvm-ffi"] == "0.1.14.post1"
    assert KernelSpec.from_key(json.dumps(manifest["kernels"][0]["spec"])) == spec


def test_concurrent_builds_of_one_entry_both_succeed():
    code = """
        import torch, tvm_rbn.functional as rbn
        y = rbn.bn_relu(torch.ones(1, 13, 3, 3), torch.ones(13), torch.zeros(13))
        print(float(y.sum()))
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert float(out) == 117.0
    entries = list((cache.cache_root() / f"v{cache.FORMAT}").glob("*/*"))
    assert not [e for e in entries if e.name.startswith(".")], "a temporary build folder was left behind"


def _run_clean(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TVM_RBN_KEEP_OMP_POLICY")}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env)


def test_importing_tvm_rbn_first_makes_pytorch_openmp_threads_yield():
    out = _run_clean("import os, tvm_rbn, torch; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"


def test_restructure_warns_when_pytorch_threads_keep_spinning():
    code = ("import torch, tvm_rbn\n"
            "tvm_rbn.restructure(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))\n")
    out = _run_clean(code)
    assert out.returncode == 0, out.stderr
    assert "ThreadSpinWarning" in out.stderr and "OMP_WAIT_POLICY=PASSIVE" in out.stderr
