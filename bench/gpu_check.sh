#!/usr/bin/env bash
# One call on a GPU machine (no internet; torch + nvcc + transformers + peft installed there):
# build with all cores, run the CUDA tests, run the GPU benchmark preset. Logs, bench.json and
# bench.png go to $OUT (default ./gpu_out). Budget: under 7 minutes on an H100.
#   device run:  bash bench/gpu_check.sh
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)" NVCC_THREADS=4
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')}"
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== build ($TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
FORCE_CUDA=1 timeout 300 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== CUDA tests"
timeout 240 python3 -m pytest python_tests/test_ops_cuda.py python_tests/test_ops.py -q -x -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark (preset gpu)"
timeout 300 python3 -m pedro_ext.bench --preset gpu --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -60 "$OUT/bench.log"
exit $status
