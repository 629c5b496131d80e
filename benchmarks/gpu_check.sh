#!/usr/bin/env bash
# The GPU checks in one short run: the CUDA tests, then the throughput benchmark on the device.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default benchmarks/results/gpu; relative to the repository root
#
# Needs a CUDA build of torch and the project's dependencies (installed or on PYTHONPATH). Each stage
# has its own time limit, so one that hangs or fails leaves the others' results; logs and the JSON
# land in OUT_DIR. Set GPU_CHECK_QUICK=1 for a smaller sweep. The exit status is 1 if the tests or the
# benchmark failed or ran out of time (each stage still runs), 0 otherwise.
set -u
cd "$(dirname "$0")/.."  # the repository root: its packages import from there, installed or not
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee "$out/versions.txt"

echo "== CUDA tests"
failed=()
stage() {  # stage NAME STATUS: remember a failed stage
    if [ "$2" = 124 ]; then failed+=("$1 (out of time)"); elif [ "$2" != 0 ]; then failed+=("$1 (status $2)"); fi
}
timeout "${GPU_TESTS_LIMIT:-170}" $py -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA 2>&1 | tee "$out/cuda_tests.log"
stage "CUDA tests" "${PIPESTATUS[0]}"

echo "== throughput on the GPU"
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    sweep=(--families teacher_classification digits_mlp --sizes 1 32 1024 --seconds 1 --wide 512)
else
    sweep=(--families teacher_classification digits_mlp charlm digits_cnn --sizes 1 32 128 1024 --seconds 1.5 --wide 256 512)
fi
timeout "${GPU_BENCH_LIMIT:-300}" $py benchmarks/throughput.py --device cuda "${sweep[@]}" --out "$out/throughput_cuda.json" \
    2>&1 | tee "$out/throughput_cuda.log"
stage "throughput" "${PIPESTATUS[0]}"
if [ ${#failed[@]} -gt 0 ]; then
    printf '== failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "== done"
