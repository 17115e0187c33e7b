#!/usr/bin/env bash
# The benchmark: training steps of tvm_rbn vs PyTorch eager vs torch.compile (resnet50 and
# densenet121 at batch 16, 224x224 by default), per-layer kernel timings, traffic model and
# peak memory. Prints tables; saves JSON and PNG under out/. Arguments: python -m tvm_rbn bench --help
#
#   bash scripts/bench.sh                        # the defaults (long: ~30 min on 2 cores)
#   bash scripts/bench.sh --model resnet50 --layers 0
#
# Run it on a quiet machine: timings taken while other work runs are not worth quoting.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m tvm_rbn bench "$@"
