#!/usr/bin/env bash
# Create .venv and install tvm_rbn with its pinned toolchain; a no-op when nothing changed.
# torch is pinned to 2.13.0: on these CPU machines that resolves to the local CPU wheel, so no
# CUDA packages are pulled. Sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TVM_RBN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.tvm_rbn-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing tvm_rbn and its pinned dependencies (first run takes a minute or two)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import torch, tvm_ffi, tvm_rbn" >/dev/null
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
