#!/usr/bin/env bash
# Tune a model's fused kernels for this machine's NVIDIA GPU, at your batch size.
#
#   bash scripts/tune_cuda.sh --model resnet50 --batch 64 --size 224 --trials 2000 --seconds 7200
#
# Run it on the machine with the GPU (under nohup: it is long). The GPU architecture is read
# from nvidia-smi; records go to tuning_logs/cuda-smXX/ after every measured batch, and
# rerunning resumes. Nothing is committed: review and commit tuning_logs/ yourself.
# Building libraries and the PyTorch bridge target the CPU only so far: these records are
# ready for the CUDA build path, which is not there yet.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "tune_cuda.sh needs an NVIDIA GPU (nvidia-smi not found); for CPUs use scripts/tune_x86.sh" >&2
    exit 2
fi
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')"
echo "tuning for cuda sm_$cap; records: $ROOT/tuning_logs/cuda-sm$cap" >&2
exec python -m tvm_rbn tune --target "cuda:sm_$cap" "$@"
