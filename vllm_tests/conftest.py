"""Tests of the vLLM plugin. Run inside the vLLM environment (vllm_tests/setup_env.sh builds it):
    .venv-vllm/bin/pytest vllm_tests -q
(the pytest script, not `python -m pytest`, so the source tree's pedro_ext, built for another
torch, is not imported instead of the installed one)."""
import os
import tempfile

# vLLM reads these when it is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in the test process
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="pedro-vllm-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import pedro_ext  # noqa: E402

_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.dirname(os.path.abspath(pedro_ext.__file__))) == _SOURCE_TREE:
    pytest.exit(f"imported pedro_ext from the source tree ({pedro_ext.__file__}), not the vLLM "
                "environment's build: run .venv-vllm/bin/pytest vllm_tests (not python -m "
                "pytest)", returncode=4)

from vllm_fixtures import make_bank, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def bank(tiny_llama, tmp_path_factory):
    return make_bank(tiny_llama, str(tmp_path_factory.mktemp("bank")))
