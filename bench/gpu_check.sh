#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (no internet; torch + nvcc + transformers + peft there).
# Builds for this GPU only, runs every op test (no stop at the first failure), runs
# compute-sanitizer memcheck and racecheck on a short subset, runs the GPU benchmark, and writes
# summary.json + logs to bench/results/<gpu name>/ (and copies them to $OUT when that is set).
# Fails when torch sees no GPU. Budget: under 8 minutes on an H100, build included.
#   device run:  bash bench/gpu_check.sh        env: BENCH_ARGS (default "--quick"), SKIP_BENCH=1
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)" NVCC_THREADS=4
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; nothing was checked" >&2
  exit 2
fi
GPU="$(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
SLUG="$(echo "$GPU" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//;s/-$//')"
RES="bench/results/$SLUG"
TMP="$(mktemp -d)"
rm -rf "$RES"; mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')}"
steps=()  # "name rc seconds"
step() {  # step NAME TIMEOUT LOG cmd...
  local name=$1 to=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "== $name"
  timeout "$to" "$@" > "$log" 2>&1
  local rc=$?
  steps+=("$name $rc $(( $(date +%s) - t0 ))")
  tail -25 "$log"
  if [ -n "${OUT:-}" ]; then cp "$RES"/* "$OUT"/ 2>/dev/null; fi
  return $rc
}

# Compiler. On the lent H100/H200 image, CXX is a wrapper (/opt/gcc/bin/g++ -> g++-real) and the
# extension it built killed the process (SIGSEGV) on every C++ exception raised by an op (argument
# errors), CPU and CUDA paths alike, while all numerics passed (bench/results/gpu-first-runs). So
# build with the distribution's compiler when there is one, and never trust a build that has not
# shown it can raise an error and survive.
{ echo "CC=${CC:-} CXX=${CXX:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"; for c in "${CXX:-}" /opt/gcc/bin/g++; do
    [ -n "$c" ] && [ -f "$c" ] && { echo "--- $c"; file "$c"; head -c 600 "$c" | tr -cd '[:print:]\n'; echo; }; done
} > "$TMP/compiler.txt" 2>&1
BUILD_ENV=(FORCE_CUDA=1)
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then BUILD_ENV+=(CC=/usr/bin/gcc CXX=/usr/bin/g++); fi
# the extension must turn a bad argument into a Python exception, not a crash
RAISE_CHECK='import torch, pedro_ext
try:
    pedro_ext.modulate(torch.ones(2, 3), torch.ones(3, 3))
except ValueError as e:
    print("raise_check ok:", str(e)[:80])
else:
    raise SystemExit("raise_check: no error raised")'
# In place, not pip -e: an offline machine's older pip cannot run setuptools' develop (it re-enters
# pip with build isolation, which needs the network); the tests import pedro_ext from the checkout.
step build 240 "$RES/build.log" env "${BUILD_ENV[@]}" python3 setup.py build_ext --inplace \
  || { echo "build failed"; }
step raise_check 60 "$TMP/raise_check.log" python3 -c "$RAISE_CHECK"
{ echo "== build env: ${BUILD_ENV[*]}"; cat "$TMP/compiler.txt"; ldd pedro_ext/_C*.so | grep -E "stdc|gcc_s|gomp"
  cat "$TMP/raise_check.log"; } >> "$RES/build.log" 2>&1
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfE)
XDIST=(); python3 -c 'import xdist' 2>/dev/null && XDIST=(-n 8)  # a crash then kills one worker, not the run
# the op suite, and every test file that has CUDA-only tests (wrapper, training, LoRA baseline)
TESTS=(python_tests/test_ops.py $(grep -l "requires_cuda\|needs a CUDA GPU" python_tests/test_*.py | grep -v test_ops.py))
[ -f python_tests/test_fuzz.py ] && TESTS+=(python_tests/test_fuzz.py)
step tests 200 "$RES/tests.log" "${PYTEST[@]}" "${XDIST[@]}" --junitxml="$TMP/tests.xml" "${TESTS[@]}"
SUBSET=(python_tests/test_ops_cuda.py -k "generate_cuda and float32 or modulate_cuda and float16 or generate_and_modulate_cuda or bad_ids")
SAN=(compute-sanitizer --target-processes all --error-exitcode 99)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 "$RES/memcheck.log" "${SAN[@]}" --tool memcheck "${PYTEST[@]}" "${SUBSET[@]}"
step racecheck 120 "$RES/racecheck.log" "${SAN[@]}" --tool racecheck --racecheck-report all "${PYTEST[@]}" "${SUBSET[@]}"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  step bench 150 "$RES/bench.log" python3 -m pedro_ext.bench --preset gpu --device cuda ${BENCH_ARGS:---quick} --out "$RES"
fi

python3 - "$RES" "$TMP/tests.xml" "$GPU" "${steps[@]}" <<'PY'
import json, os, subprocess, sys, xml.etree.ElementTree as ET
import torch
res, xml, gpu, *steps = sys.argv[1:]
summary = {"gpu": gpu, "capability": ".".join(map(str, torch.cuda.get_device_capability())),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip(),
           "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
           "steps": {s.split()[0]: {"rc": int(s.split()[1]), "seconds": int(s.split()[2])} for s in steps}}
if os.path.exists(xml):
    suite = ET.parse(xml).getroot().find("testsuite")
    summary["tests"] = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
summary["ok"] = all(v["rc"] == 0 for v in summary["steps"].values()) and not summary.get("failed") \
    and "tests" in summary["steps"]
json.dump(summary, open(os.path.join(res, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["ok"] else 1)
PY
status=$?
if [ -n "${OUT:-}" ]; then cp "$RES"/* "$OUT"/ 2>/dev/null; fi
exit $status
