"""The host-side pieces alone: the step planner (rows keyed by request id across reordered,
mixed prefill/decode batches) and the adapter bank (loading, checks, padding)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from pedro_ext import reference
from pedro_ext.serving_vllm.bank import AdapterBank, ModelDims, UnknownAdapterError, resolve_adapter_paths
from pedro_ext.serving_vllm.step_plan import PromptSplitError, StepPlanner

from vllm_fixtures import ADAPTERS

ADAPTER_OF = {"a": 0, "b": 1, "base": -1}.__getitem__


def step(planner, batch, alive=None):
    """batch: [(req_id, num_computed, num_scheduled, prompt_length)] in row order."""
    ids = [b[0] for b in batch]
    arr = lambda k: np.array([b[k] for b in batch], dtype=np.int64)  # noqa: E731
    return planner.plan(ids, arr(1), arr(2), arr(3), set(alive if alive is not None else ids),
                        ADAPTER_OF)


def test_rows_follow_request_ids_through_reordering_and_mixed_batches():
    p = StepPlanner(num_slots=2)
    s1 = step(p, [("a", 0, 3, 3), ("base", 0, 2, 2)])
    slot_a = s1.token_rows[0]
    assert s1.token_rows.tolist() == [slot_a] * 3 + [2, 2]  # base row = num_slots
    assert s1.plan.tolist() == [[slot_a, 0, 0, 3]]
    # next step: a decodes, b arrives (prefill) in front of it, base decodes
    s2 = step(p, [("b", 0, 4, 4), ("base", 2, 1, 2), ("a", 3, 1, 3)])
    slot_b = s2.token_rows[0]
    assert slot_b != slot_a
    assert s2.token_rows.tolist() == [slot_b] * 4 + [2, slot_a]
    assert s2.plan.tolist() == [[slot_b, 1, 0, 4]]
    s3 = step(p, [("a", 4, 1, 3), ("b", 4, 1, 4)])
    assert s3.token_rows.tolist() == [slot_a, slot_b] and s3.plan.shape == (0, 4)
    assert p.vector_computations == 2


def test_rows_are_freed_when_a_request_is_gone_and_reused():
    p = StepPlanner(num_slots=1)
    step(p, [("a", 0, 2, 2)])
    step(p, [("a", 2, 1, 2)])
    assert len(p.slots) == 1
    step(p, [("b", 0, 3, 3)], alive={"b"})  # a finished: its row goes to b
    assert len(p.slots) == 1 and p.slots.get("b") == 0 and p.slots.get("a") is None


def test_a_preempted_request_recomputes_its_vectors_on_resume():
    p = StepPlanner(num_slots=2)
    step(p, [("a", 0, 3, 3)])
    step(p, [("a", 3, 1, 3)])
    # resumed after preemption: prompt + generated token recomputed, pool over the prompt only
    s = step(p, [("a", 0, 4, 3)])
    assert s.plan.tolist() == [[p.slots.get("a"), 0, 0, 3]]


@pytest.mark.parametrize("batch", [[("a", 0, 2, 5)], [("a", 2, 3, 5)]])
def test_a_split_prompt_is_refused(batch):
    with pytest.raises(PromptSplitError, match="whole prompt"):
        step(StepPlanner(num_slots=2), batch)
    assert step(StepPlanner(num_slots=2), [("base", 0, 1, 4)]).token_rows.tolist() == [2]


def test_a_full_table_evicts_only_requests_outside_the_step():
    p = StepPlanner(num_slots=1)
    step(p, [("a", 0, 2, 2)])
    with pytest.raises(RuntimeError, match="more than 1 adapter requests"):
        step(p, [("a", 2, 1, 2), ("b", 0, 2, 2)])
    p = StepPlanner(num_slots=1)
    step(p, [("a", 0, 2, 2)])
    step(p, [("b", 0, 2, 2)], alive={"a", "b"})  # a preempted (alive, not scheduled)
    assert p.slots.get("b") == 0
    with pytest.raises(RuntimeError, match="vectors are gone"):
        step(p, [("a", 2, 1, 2)], alive={"a", "b"})


def _dims():
    return ModelDims(hidden_size=64, num_layers=3, q_size=64, kv_size=32, intermediate_size=128)


def test_bank_stacks_every_adapter_and_pads_without_changing_it(bank):
    assert {c.pool_norm for c in AdapterBank(bank, _dims()).configs.values()} == \
        {"none", "rms", "layer"}  # the engine tests compare every norm with HF
    loaded = AdapterBank(bank, _dims())
    assert loaded.names == list(ADAPTERS)
    torch.manual_seed(0)
    pooled = torch.randn(1, 64, dtype=torch.float64)
    for layer in range(3):
        stacked = loaded.layer_tensors(layer, torch.float64)
        for name in loaded.names:
            i = loaded.adapter_id(name)
            got = reference.generate(pooled, torch.tensor([i]), *(stacked[k] for k in (
                "w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")))
            own = loaded._weights[name].get(layer)
            if own is None:  # max3 skips layer 0: exactly the identity
                assert torch.equal(got, torch.ones_like(got)), name
                continue
            want = reference.generate(pooled, torch.tensor([0]), *(own[k][None].double() for k in (
                "w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")))
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert loaded.adapter_id(None) == loaded.adapter_id("__base__") == -1
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        loaded.adapter_id("nope")


def test_a_save_pretrained_folder_is_a_bank(bank, tmp_path):
    top = os.path.dirname(bank["mean8"])
    assert resolve_adapter_paths(top) == bank
    shutil.copytree(bank["last4"], tmp_path / "root")  # "default" at the top level
    shutil.copytree(bank["att6"], tmp_path / "root" / "other")
    assert set(resolve_adapter_paths(str(tmp_path / "root"))) == {"default", "other"}


def _broken_copy(bank, tmp_path, edit_config=None, edit_weights=None):
    path = tmp_path / "broken"
    shutil.copytree(bank["mean8"], path)
    if edit_config:
        cfg = json.loads((path / "adapter_config.json").read_text())
        edit_config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_weights:
        from safetensors.torch import load_file, save_file
        state = load_file(str(path / "adapter_model.safetensors"))
        edit_weights(state)
        save_file(state, str(path / "adapter_model.safetensors"))
    return {"broken": str(path)}


@pytest.mark.parametrize("edit_config, edit_weights, message", [
    (lambda c: c.update(hidden_size=32), None, "hidden_size=32"),
    (lambda c: c.update(target_modules=["q_proj", "k_proj"]), None, "serves adapters of"),
    (lambda c: c.update(pooling="median"), None, "pooling must be one of"),
    (None, lambda s: s.update({"layers.0.w_up": torch.zeros(8, 7)}),
     r"layer 0 of .*: w_up has shape \(8, 7\)"),
    (None, lambda s: s.pop("layers.2.b_down"), "layer 2 of .* lacks \\['b_down'\\]"),
    (None, lambda s: s.update({"layers.1.b_up": torch.full((224,), float("nan"))}),
     "layer 1 of .*: b_up holds non-finite"),
    (None, lambda s: s.update({"extra": torch.zeros(1)}), "unexpected tensor 'extra'"),
])
def test_a_broken_adapter_is_refused_with_its_name_and_file(bank, tmp_path, edit_config,
                                                             edit_weights, message):
    spec = _broken_copy(bank, tmp_path, edit_config, edit_weights)
    with pytest.raises(ValueError, match=message) as info:
        AdapterBank(spec, _dims())
    assert "broken" in str(info.value)


@pytest.mark.parametrize("spec, error, message", [
    ({}, ValueError, "empty"),
    ({"a b": "/tmp"}, ValueError, "adapter name"),
    ({"__base__": "/tmp"}, ValueError, "adapter name"),
    ({"a": "/does/not/exist"}, FileNotFoundError, "not a folder"),
    ("/does/not/exist", FileNotFoundError, "not a folder"),
    (42, TypeError, "must be a folder"),
])
def test_bad_bank_specs(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_adapter_paths(spec)


def test_a_gpu_engine_with_cuda_graphs_is_refused():
    """The GPU path is not validated: on a GPU only eager mode is accepted (a captured graph
    would freeze the plan that refresh_vectors reads on the host)."""
    from types import SimpleNamespace as NS

    from pedro_ext.serving_vllm.config_check import unsupported_settings

    def config(device, eager):
        return NS(scheduler_config=NS(enable_chunked_prefill=False), lora_config=None,
                  cache_config=NS(enable_prefix_caching=False), speculative_config=None,
                  parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
                  device_config=NS(device_type=device), model_config=NS(enforce_eager=eager))

    assert unsupported_settings(config("cpu", False)) == []
    assert unsupported_settings(config("cuda", True)) == []
    (problem,) = unsupported_settings(config("cuda", False))
    assert "CUDA graphs on cuda are not supported yet" in problem and "--enforce-eager" in problem
