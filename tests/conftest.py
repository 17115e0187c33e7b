"""Test set-up: a fresh kernel cache per session, seeded inputs, one tolerance table."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as importing tvm_rbn first does (tvm_rbn._threads)
import torch  # noqa: E402

# Each test session builds into its own cache, so the build path itself is exercised.
os.environ.setdefault("TVM_RBN_CACHE_DIR", tempfile.mkdtemp(prefix="tvm_rbn_test_cache_"))

# Absolute / relative tolerances per dtype, for values of order 1. Reductions over m elements
# are compared after scaling by the reference's magnitude (see assert_close).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    # Five free-running SGD steps of a deep model in fp64: a rounding difference of 1e-13 in
    # the first step's gradients grows ~10x per step (measured on resnet50 at 64x64, batch 4,
    # where layer4's BatchNorms normalize over 16 values, with lr 1e-4), so step 5 agrees to ~1e-8.
    "float64-after-sgd-steps": dict(atol=1e-7, rtol=1e-7),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float | None = None,
                 tolerance: str | None = None) -> None:
    """Compare with the table's tolerance (by dtype, or the named entry); `scale` (default:
    max |expected|, at least 1) sets atol's unit."""
    tol = TOLERANCES[tolerance or expected.dtype]
    unit = scale if scale is not None else max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs()
    bound = tol["atol"] * unit + tol["rtol"] * expected.abs()
    if not bool((diff <= bound).all()):
        worst = (diff - bound).argmax()
        raise AssertionError(
            f"{what}: max |diff| {diff.max().item():.3e} (unit {unit:.3e}); worst at flat index "
            f"{worst.item()}: got {actual.flatten()[worst].item():.9g}, expected {expected.flatten()[worst].item():.9g}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
