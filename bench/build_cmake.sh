#!/usr/bin/env bash
# Builds libpedro_ext_ops.so with CMake into $1 (default build/cmake), with the CUDA kernels when
# a CUDA toolkit is found (PEDRO_EXT_NO_CUDA=1: CPU only, as for setup.py). Used by CI and by
# bench/gpu_check.sh.
set -euo pipefail
out="${1:-build/cmake}"
mkdir -p "$(dirname "$out")"
prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
if [ -x "$cuda_home/bin/nvcc" ] && python3 -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  # name the real toolkit (`which nvcc` may be a wrapper script outside it): a CUDA build of
  # torch needs it found even when our CUDA kernels are left out
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc"
         -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}")
  [ "${PEDRO_EXT_NO_CUDA:-0}" = 1 ] || args+=(-DPEDRO_EXT_WITH_CUDA=ON)
fi
cmake -S . -B "$out" "${args[@]}" > "$out.configure.log" 2>&1 || { cat "$out.configure.log"; exit 1; }
cmake --build "$out" -j "${MAX_JOBS:-2}" > "$out.build.log" 2>&1 || { tail -50 "$out.build.log"; exit 1; }
echo "built $out/libpedro_ext_ops.so"
