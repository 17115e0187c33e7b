#!/usr/bin/env bash
# Tune a model's fused kernels for this x86 CPU (AVX-512 or AVX2), at your batch size.
#
#   bash scripts/tune_x86.sh --model resnet50 --batch 16 --size 224 --trials 2000 --seconds 7200
#
# Long: run it under nohup. Records go to tuning_logs/<family>/ (x86-avx512 or x86-avx2) after
# every measured batch; rerunning the same command resumes. Nothing is committed: review and
# commit tuning_logs/ yourself. Then `python -m tvm_rbn build ...` makes the library.
# Extra options: python -m tvm_rbn tune --help (e.g. --rpc-tracker HOST:PORT to measure on
# several machines of the same family).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
family="$(python -c 'from tvm_rbn.build.target import host_family; print(host_family())')"
# --target FAMILY tunes for another x86 family (measured on this machine)
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --target) family="${args[i+1]:-$family}" ;;
        --target=*) family="${args[i]#--target=}" ;;
    esac
done
case "$family" in
    x86-avx512|x86-avx2) ;;
    *) echo "tune_x86.sh tunes x86 families (x86-avx512, x86-avx2); the target here is $family" >&2; exit 2 ;;
esac
# TVM measures on as many threads as training will use (PyTorch's count), not its default half.
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-$(python -c 'import torch; print(torch.get_num_threads())')}"
echo "tuning for $family with $TVM_NUM_THREADS threads; records: $ROOT/tuning_logs/$family" >&2
exec python -m tvm_rbn tune "$@"
