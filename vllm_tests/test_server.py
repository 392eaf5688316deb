"""vLLM's OpenAI-compatible server with the PEDRO model, on loopback: real HTTP requests, one
tenant each through vllm_xargs, answered with PedroModel.generate's tokens; bad requests get a
400 and leave the server serving. Bounded: one server, a dozen requests, fixed time limits."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from vllm_fixtures import ADAPTERS, hf_greedy, prompts

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_llama, bank, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    port = _free_port()
    overrides = {"architectures": ["PedroLlamaForCausalLM"],
                 "pedro_adapters": os.path.dirname(bank["mean8"])}  # the bank's folder
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
           "--hf-overrides", json.dumps(overrides)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: engine process
    log = open(workdir / "server.log", "w")
    # cwd outside the checkout: `python -m` puts the working directory on sys.path
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail("the server exited during start-up:\n" +
                            (workdir / "server.log").read_text()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n" +
                            (workdir / "server.log").read_text()[-4000:])
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _completion(base, prompt, adapter):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if adapter is not None:
        body["vllm_xargs"] = {"pedro_adapter": adapter}
    return _post(base + "/v1/completions", body)


def test_concurrent_tenants_get_their_adapters_tokens(server, tiny_llama, bank):
    tenants = list(ADAPTERS) + [None, "mean8"]
    ps = prompts(len(tenants), seed=4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tenants)) as pool:
        results = list(pool.map(lambda i: _completion(server, ps[i], tenants[i]),
                                range(len(tenants))))
    for prompt, tenant, (status, body) in zip(ps, tenants, results):
        assert status == 200, body
        want, _ = hf_greedy(tiny_llama, bank.get(tenant), prompt, NEW_TOKENS)
        assert body["choices"][0]["token_ids"] == want, f"tenant {tenant}"
        if tenant is not None:
            base, _ = hf_greedy(tiny_llama, None, prompt, NEW_TOKENS)
            assert want != base, f"adapter {tenant} leaves this prompt's output unchanged"


@pytest.mark.parametrize("xargs, message", [
    ({"pedro_adapter": "nope"}, "unknown PEDRO adapter 'nope'"),
    ({"pedro_adapter": 3}, "must be an adapter name"),
])
def test_a_bad_tenant_gets_400_and_the_server_keeps_serving(server, tiny_llama, bank, xargs,
                                                            message):
    status, body = _post(server + "/v1/completions",
                         {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2,
                          "vllm_xargs": xargs})
    assert status == 400, body
    assert message in json.dumps(body)
    prompt = prompts(1, seed=5)[0]
    status, body = _completion(server, prompt, "last4")
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == hf_greedy(tiny_llama, bank["last4"], prompt,
                                                        NEW_TOKENS)[0]
