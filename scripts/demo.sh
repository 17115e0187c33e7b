#!/usr/bin/env bash
# Quick start, command 1: set up, then run the main job on the host CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m tvm_rbn demo "$@"
