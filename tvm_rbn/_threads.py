"""PyTorch's OpenMP workers and TVM's thread pool share the cores: make PyTorch's yield.

After each parallel region, GNU OpenMP's workers (PyTorch's intra-op pool) spin for a while
before they sleep. A restructured step interleaves TVM kernels with PyTorch ops (finalize
math, adds, the optimizer), so each TVM kernel starts while PyTorch's workers are still
spinning on the same cores: measured on a 2-core machine, a densenet121 training step at
batch 16 took 1.68 s with the default policy and 1.17 s with ``OMP_WAIT_POLICY=PASSIVE``
(PyTorch eager alone: 1.66 s and 1.73 s). libgomp reads the policy once, when it is loaded
(with torch), so it has to be in the environment before torch is imported: importing
tvm_rbn first sets it unless you set ``OMP_WAIT_POLICY`` yourself or set
``TVM_RBN_KEEP_OMP_POLICY=1``; ``restructure`` warns when it could not take effect.
"""
from __future__ import annotations

import os
import sys
import warnings

KEEP = "TVM_RBN_KEEP_OMP_POLICY"


def set_passive_before_torch() -> None:
    if "torch" not in sys.modules and os.environ.get(KEEP, "") in ("", "0"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class ThreadSpinWarning(UserWarning):
    """PyTorch's OpenMP threads spin between ops and slow tvm_rbn's kernels down."""


_warned = [False]


def warn_if_spinning() -> None:
    if _warned[0] or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or os.environ.get(KEEP, "") not in ("", "0"):
        return
    _warned[0] = True
    warnings.warn("tvm_rbn: PyTorch was imported before tvm_rbn, so its OpenMP threads keep spinning after each "
                  "op and compete with tvm_rbn's kernels for the cores (about 30% slower steps measured); set "
                  "OMP_WAIT_POLICY=PASSIVE in the environment, or import tvm_rbn before torch "
                  f"(silence this with {KEEP}=1)", ThreadSpinWarning, stacklevel=3)
