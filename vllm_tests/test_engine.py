"""The PEDRO model inside vLLM's engine (in this process), eager and compiled: every request's
greedy tokens equal PedroModel.generate's on the same weights, whatever else shares its batch."""
import gc

import pytest

from vllm import LLM, SamplingParams
from vllm.config import CompilationMode
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError

from pedro_ext.serving_vllm import engine_kwargs
from pedro_ext.serving_vllm.model import PedroLlamaForCausalLM

from vllm_fixtures import ADAPTERS, hf_greedy, prompts

NEW_TOKENS = 8
# |vLLM - HF| of a sampled token's log-probability, float32 on both sides. The two differ in
# kernels (fused qkv / gate_up, vLLM's RMSNorm and attention, summation order): the largest
# difference measured over 20 requests x 16 tokens was 1.05e-6, eager and compiled.
LOGPROB_TOL = 1e-4


def make_llm(model, adapters, eager, **overrides):
    kwargs = engine_kwargs(adapters, dtype="float32", enforce_eager=eager, max_model_len=256,
                           max_num_seqs=6, distributed_executor_backend="uni", seed=0)
    kwargs.update(overrides)
    return LLM(model, **kwargs)


def close(llm):
    from vllm.distributed import cleanup_dist_env_and_memory
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture(scope="module", params=["eager", "compiled"])
def llm(request, tiny_llama, bank):
    engine = make_llm(tiny_llama, bank, eager=request.param == "eager")
    yield engine
    close(engine)


def stats(llm):
    (s,) = llm.apply_model(lambda model: model.pedro_stats())
    return s


def greedy(n=NEW_TOKENS, adapter=None):
    extra = None if adapter is None else {"pedro_adapter": adapter}
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0,
                          extra_args=extra)


def check_against_hf(model, bank, prompt, adapter, output, n=NEW_TOKENS):
    want_tokens, want_logprobs = hf_greedy(model, bank.get(adapter), prompt, n)
    got_tokens = list(output.token_ids)
    assert got_tokens == want_tokens, f"adapter {adapter}: vLLM {got_tokens} != HF {want_tokens}"
    got_logprobs = [step[t].logprob for step, t in zip(output.logprobs, got_tokens)]
    worst = max(abs(a - b) for a, b in zip(got_logprobs, want_logprobs))
    assert worst < LOGPROB_TOL, f"adapter {adapter}: log-prob differs by {worst}"


def test_the_engine_runs_the_pedro_model(llm):
    assert llm.apply_model(lambda m: type(m).__name__) == [PedroLlamaForCausalLM.__name__]
    llm.generate([{"prompt_token_ids": [5, 6]}], greedy(2, "mean8"), use_tqdm=False)
    eager = llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE
    # compiled: the decoder stack ran as one traced graph (vLLM's no-guard wrapper)
    assert llm.apply_model(lambda m: getattr(m.model, "compiled", False)) == [not eager]


def test_mixed_batch_matches_hugging_face_for_every_request(llm, tiny_llama, bank):
    names = list(ADAPTERS) + [None]
    ps = prompts(2 * len(names), seed=1)
    adapters = [names[i % len(names)] for i in range(len(ps))]  # more requests than max_num_seqs
    before = stats(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], [greedy(adapter=a) for a in adapters],
                        use_tqdm=False)
    for p, a, out in zip(ps, adapters, outs):
        check_against_hf(tiny_llama, bank, p, a, out.outputs[0])
    after = stats(llm)
    assert after["vector_computations"] - before["vector_computations"] == \
        sum(a is not None for a in adapters)
    # the adapters matter: each changes the base model's tokens for these prompts
    for name in ADAPTERS:
        i = adapters.index(name)
        base, _ = hf_greedy(tiny_llama, None, ps[i], NEW_TOKENS)
        assert list(outs[i].outputs[0].token_ids) != base, f"{name} leaves the output unchanged"


def test_staggered_arrivals(llm, tiny_llama, bank):
    """Requests join while others decode (mixed prefill / decode steps, reordered batches,
    rows freed and reused); lengths differ so they leave at different steps."""
    engine = llm.llm_engine
    ps = prompts(7, seed=2)
    plan = [  # (arrival step, adapter, new tokens)
        (0, "mean8", 9), (0, None, 4), (1, "att6", 6), (3, "last4", 10), (3, "mean8", 3),
        (4, "max3", 7), (6, "__base__", 5)]
    outputs, step = {}, 0
    while len(outputs) < len(plan):
        for i, (arrival, adapter, n) in enumerate(plan):
            if arrival == step:
                engine.add_request(f"stagger-{i}", {"prompt_token_ids": ps[i]},
                                   greedy(n, adapter))
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
        step += 1
        assert step < 100, "the engine did not finish"
    for i, (_, adapter, n) in enumerate(plan):
        check_against_hf(tiny_llama, bank, ps[i], adapter, outputs[f"stagger-{i}"], n)
    llm.generate([{"prompt_token_ids": [5, 6]}], greedy(1), use_tqdm=False)
    assert stats(llm)["held_rows"] == 0, "finished requests still hold vector rows"


@pytest.mark.parametrize("adapter, message", [
    ("nope", "unknown PEDRO adapter 'nope'"),
    (7, "must be an adapter name"),
])
def test_a_bad_adapter_fails_its_request_not_the_engine(llm, tiny_llama, bank, adapter, message):
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=2, extra_args={"pedro_adapter": adapter}),
                     use_tqdm=False)
    p = prompts(1, seed=3)[0]
    (out,) = llm.generate([{"prompt_token_ids": p}], greedy(adapter="att6"), use_tqdm=False)
    check_against_hf(tiny_llama, bank, p, "att6", out.outputs[0])


def test_a_forward_without_the_runner_hook_fails_loudly(llm, monkeypatch):
    """If vLLM stopped calling the hooked method, serving would silently ignore the adapters:
    the model refuses to run instead. (Last in this module: the engine is broken after it.)"""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    hooked = GPUModelRunner._model_forward
    assert getattr(hooked, "_pedro_hook", False), "the runner hook is not installed"
    monkeypatch.setattr(GPUModelRunner, "_model_forward", hooked.__wrapped__)
    with pytest.raises(Exception, match="without the PEDRO runner hook"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], greedy(2, "mean8"), use_tqdm=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(enable_chunked_prefill=True), "chunked prefill is on"),
    (dict(enable_prefix_caching=True), "prefix caching is on"),
    (dict(long_prefill_token_threshold=16), "splits long prompts"),
    (dict(async_scheduling=True), "async scheduling"),
    (dict(enable_lora=True), "LoRA"),
])
def test_unsupported_settings_are_refused_at_start_up(tiny_llama, bank, overrides, message):
    kwargs = engine_kwargs(bank, max_model_len=256, distributed_executor_backend="uni")
    kwargs.update(overrides)
    with pytest.raises(Exception, match=message) as info:
        EngineArgs(model=tiny_llama, **kwargs).create_engine_config()
    assert "PEDRO" in str(info.value)


def test_a_missing_or_broken_bank_is_refused_at_start_up(tiny_llama, bank, tmp_path):
    kwargs = engine_kwargs(bank, max_model_len=256, distributed_executor_backend="uni")
    del kwargs["hf_overrides"]["pedro_adapters"]
    with pytest.raises(Exception, match="needs its adapters"):
        EngineArgs(model=tiny_llama, **kwargs).create_engine_config()
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "hidden_size": 999}')
    kwargs = engine_kwargs({"bad": str(tmp_path)}, max_model_len=256,
                           distributed_executor_backend="uni")
    with pytest.raises(Exception, match="hidden_size=999"):
        EngineArgs(model=tiny_llama, **kwargs).create_engine_config()
