"""Adapter lifecycle and peft parity: failed loads leave the model as it was, wrapping twice,
deleting the last adapter, clear errors, Trainer checkpoints, peft's signatures."""
import json
import os
import pathlib

import pytest
import torch
import transformers

from pedro_ext import PedroConfig, PedroModel, get_pedro_model
from pedro_ext.layer import PedroLinear

from tiny_models import randomize_adapter, tiny_model


def prompts(batch=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, length), generator=g)


def _snapshot(model):
    """Everything wrapping touches: module tree, hooks, grad flags, instance forwards, weights."""
    return dict(
        modules=[(n, type(m).__name__, "forward" in vars(m), len(m._forward_pre_hooks),
                  len(m._forward_hooks)) for n, m in model.named_modules()],
        grads=[(n, p.requires_grad) for n, p in model.named_parameters()],
        state={k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grads"] == before["grads"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def _saved_adapter(tmp_path, **model_kw):
    pedro = get_pedro_model(tiny_model(**model_kw), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=1)
    pedro.save_pretrained(str(tmp_path / "ad"))
    return pedro.eval(), str(tmp_path / "ad")


# ----------------------------------------------------------------------- failed loads
def test_a_failed_load_leaves_the_model_as_it_was_and_names_the_path(tmp_path):
    _, path = _saved_adapter(tmp_path)
    model = tiny_model(hidden_size=32, intermediate_size=64)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"{path}.*hidden_size=48"):
        PedroModel.from_pretrained(model, path)
    _assert_unchanged(model, before)
    weights = os.path.join(path, "adapter_model.safetensors")
    good = open(weights, "rb").read()
    open(weights, "wb").write(good[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable"):
        PedroModel.from_pretrained(tiny_model(), path)
    open(weights, "wb").write(good)
    # shapes that do not fit, found only after wrapping: unwrapped again
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    cfg.update(hidden_size=None, r=3)
    json.dump(cfg, open(os.path.join(path, "adapter_config.json"), "w"))
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="has shape"):
        PedroModel.from_pretrained(model, path)
    _assert_unchanged(model, before)


def test_non_finite_adapter_weights_are_refused_and_leave_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _saved_adapter(tmp_path)
    weights = os.path.join(path, "adapter_model.safetensors")
    state = load_file(weights)
    key = sorted(k for k in state if k.endswith("w_up"))[-1]
    state[key][0, 0] = float("nan")
    save_file(state, weights)
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: {key} holds non-finite"):
        PedroModel.from_pretrained(model, path)
    _assert_unchanged(model, before)
    pedro = get_pedro_model(model, PedroConfig(r=4))
    with pytest.raises(ValueError, match="non-finite"):
        pedro.load_adapter(path, "bad")
    assert list(pedro.peft_config) == ["default"]
    state[key] = torch.zeros(state[key].shape, dtype=torch.int64)
    save_file(state, weights)
    with pytest.raises(ValueError, match=f"{key} has dtype torch.int64, adapter weights are"):
        pedro.load_adapter(path, "bad")
    state[key] = torch.zeros(state[key].shape)
    state["layers.0.renamed"] = state.pop("layers.0.b_up")
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"does not fit this model: lacks \['layers.0.b_up'\], "
                                         r"has unexpected \['layers.0.renamed'\]"):
        pedro.load_adapter(path, "bad")
    assert list(pedro.peft_config) == ["default"]


def test_a_failed_wrap_leaves_the_model_as_it_was_and_a_later_one_works(tmp_path):
    pedro_saved, path = _saved_adapter(tmp_path)
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="has no module"):
        get_pedro_model(model, PedroConfig(target_modules=["q_proj", "o_proj", "nope_proj"]))
    _assert_unchanged(model, before)
    loaded = PedroModel.from_pretrained(model, path).eval()
    ids = prompts()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pedro_saved(ids).logits)


def test_wrapping_twice_says_already_wrapped():
    model = tiny_model()
    pedro = get_pedro_model(model, PedroConfig())
    with pytest.raises(ValueError, match="already wrapped"):
        get_pedro_model(model, PedroConfig())
    with pytest.raises(ValueError, match="already a PedroModel"):
        get_pedro_model(pedro, PedroConfig())
    pedro.unload()
    get_pedro_model(model, PedroConfig())  # after unload the model can be wrapped again


# ----------------------------------------------------------------------- adapter lifecycle
def test_deleting_the_last_adapter_runs_the_base_model_until_one_is_added():
    model = tiny_model()
    ids = prompts()
    with torch.no_grad():
        base_logits = model(ids).logits
    base_out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    pedro = get_pedro_model(model, PedroConfig(r=4), adapter_name="a")
    randomize_adapter(pedro, "a", seed=2)
    pedro.delete_adapter("a")
    assert pedro.active_adapters == [] and pedro.active_adapter is None
    with torch.no_grad():
        assert torch.equal(pedro(ids).logits, base_logits)
        assert torch.equal(pedro.get_base_model()(ids).logits, base_logits)
    assert torch.equal(pedro.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       base_out)
    with pytest.raises(ValueError, match="no adapters to save"):
        pedro.save_pretrained("unused")
    pedro.add_adapter("b", PedroConfig(r=3))
    assert pedro.active_adapter == "b"
    randomize_adapter(pedro, "b", seed=3)
    pedro.eval()
    with torch.no_grad():
        assert not torch.allclose(pedro(ids).logits, base_logits)
    assert pedro.unload() is model
    with torch.no_grad():
        assert torch.equal(pedro(ids).logits, base_logits)
    with pytest.raises(ValueError, match="unloaded"):
        pedro.add_adapter("c", PedroConfig())
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        pedro(ids, adapter_names=["b", None])


def test_ambiguous_calls_raise_clear_errors():
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="a")
    pedro.add_adapter("b", PedroConfig(r=4))
    with pytest.raises(ValueError, match="set_adapter takes one adapter name"):
        pedro.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="got the string 'caps'"):
        pedro(prompts(), adapter_names="caps")
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch=2, positions\]"):
        pedro(prompts(), attention_mask=torch.ones(3, 6))
    with pytest.raises(ValueError, match="prompt_lengths must have one entry per row"):
        pedro(prompts(), attention_mask=torch.ones(2, 6), prompt_lengths=[1, 2, 3])
    for bad in ([3, -1], [3, 0], [2.5, 3.0]):
        with pytest.raises(ValueError, match=r"prompt_lengths must be integers >= 1"):
            pedro(prompts(), attention_mask=torch.ones(2, 6), prompt_lengths=bad)


# ----------------------------------------------------------------------- peft parity
def test_nesting_matches_peft():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(target_modules=["q_proj"]))
    model = tiny_model()
    pedro = get_pedro_model(model, PedroConfig())
    assert type(pedro.base_model.model) is type(lora.base_model.model) is type(model)
    assert pedro.base_model.model is model is pedro.get_base_model()
    assert pedro.config is model.config  # attributes reach through the nesting


def test_peft_signatures(tmp_path):
    peft = pytest.importorskip("peft")
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4, task_type=peft.TaskType.CAUSAL_LM))
    pedro.add_adapter(adapter_name="other", peft_config=PedroConfig(r=2, task_type="CAUSAL_LM"))
    randomize_adapter(pedro, "default", seed=4)
    randomize_adapter(pedro, "other", seed=5)
    pedro.eval()
    ids = prompts()
    with torch.no_grad():
        want = pedro(ids, adapter_names=["default", "other"]).logits

    pedro.save_pretrained(str(tmp_path / "no"), is_main_process=False)
    assert not os.path.exists(tmp_path / "no")
    pedro.save_pretrained(str(tmp_path / "bin"), safe_serialization=False,
                          selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "bin" / "other")) == ["adapter_config.json",
                                                              "adapter_model.bin"]
    pedro.save_pretrained(str(tmp_path / "st"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        pedro.save_pretrained(str(tmp_path / "x"), foo=1)

    cfg = PedroConfig.from_pretrained(str(tmp_path / "st"))
    loaded = PedroModel.from_pretrained(tiny_model(), str(tmp_path / "st"), config=cfg,
                                        torch_device="cpu", is_trainable=True)
    assert all(p.requires_grad for p in loaded.adapter_parameters())
    loaded.load_adapter(str(tmp_path / "bin"), "other", subfolder="other")
    assert not any(p.requires_grad for p in loaded.adapter_parameters("other"))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, adapter_names=["default", "other"]).logits, want)
    frozen = PedroModel.from_pretrained(tiny_model(), str(tmp_path / "bin"), subfolder="other")
    assert not any(p.requires_grad for p in frozen.adapter_parameters())
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        PedroModel.from_pretrained(tiny_model(), str(tmp_path / "st"), low_cpu_mem_usage=True)

    out = pedro.generate(inputs=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, pedro.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))

    with torch.no_grad():
        active = pedro(ids).logits
        pedro.disable_adapter_layers()
        with pedro.disable_adapter():
            base = pedro(ids).logits
        assert torch.equal(pedro(ids).logits, base)
        assert torch.equal(pedro.get_base_model()(ids).logits, base)
        pedro.enable_adapter_layers()
        assert torch.equal(pedro(ids).logits, active)

    pedro.set_requires_grad(["default", "other"])
    status = pedro.get_model_status()
    assert status.requires_grad == {"default": True, "other": True}
    pedro.set_requires_grad("other", False)
    status = pedro.get_model_status()
    assert status.requires_grad == {"default": True, "other": False}
    assert status.active_adapters == ["default"] and status.available_adapters == ["default", "other"]
    assert status.peft_types == {"default": "PEDRO", "other": "PEDRO"} and status.enabled
    assert status.base_model_type == "LlamaForCausalLM" and status.devices["other"] == ["cpu"]
    assert status.num_adapter_layers == 2 * 3


def test_configs_saved_before_pool_norm_existed_load_without_a_norm(tmp_path):
    """The default pool_norm is "rms"; an adapter_config.json without the key was trained
    without a norm and must keep computing the same function."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4, pool_norm="none"))
    randomize_adapter(pedro, "default", seed=8)
    pedro.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_config.json"
    cfg = json.load(open(file))
    del cfg["pool_norm"]
    json.dump(cfg, open(file, "w"))
    assert PedroConfig().pool_norm == "rms"
    assert PedroConfig.from_pretrained(str(tmp_path)).pool_norm == "none"
    reloaded = PedroModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    ids = prompts()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pedro.eval()(ids).logits)


def test_config_rejects_what_pedro_does_not_support():
    with pytest.raises(ValueError, match="task_type must be None or 'CAUSAL_LM'"):
        PedroConfig(task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="modules_to_save.*not supported"):
        PedroConfig(modules_to_save=["lm_head"])
    assert PedroConfig(modules_to_save=[]).modules_to_save == []


# ----------------------------------------------------------------------- Trainer
def test_trainer_checkpoints_write_the_adapter(tmp_path):
    from torch.utils.data import Dataset

    ids = prompts(batch=8, length=10, seed=7)

    class Data(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]),
                    "labels": ids[i], "prompt_lengths": torch.tensor(4)}

    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pedro = get_pedro_model(model, PedroConfig(r=4))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=pedro, args=args, train_dataset=Data())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        files = os.listdir(tmp_path / folder)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files), files
        assert "model.safetensors" not in files
    pedro.eval()
    for folder in ("checkpoint-4", "final"):
        reloaded = PedroModel.from_pretrained(tiny_model(tie_word_embeddings=True),
                                              str(tmp_path / folder)).eval()
        for a, b in zip(reloaded.adapter_parameters(), pedro.adapter_parameters()):
            assert torch.equal(a, b)
    first = PedroModel.from_pretrained(tiny_model(tie_word_embeddings=True),
                                       str(tmp_path / "checkpoint-2"))
    assert any(not torch.equal(a, b) for a, b in zip(first.adapter_parameters(),
                                                     pedro.adapter_parameters()))


def test_weights_edited_in_place_in_eval_mode_are_used_at_the_next_call():
    """The inference stack of the bank is cached; load_state_dict or an in-place edit under
    no_grad must still reach the next forward, compared with a freshly loaded model."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=2)
    pedro.eval()
    ids = prompts()
    with torch.no_grad():
        before = pedro(ids).logits
        state = {k: v * 3 for k, v in pedro.state_dict().items() if "pedro_bank" in k}
        pedro.load_state_dict(state, strict=False)
        scaled = pedro(ids).logits
        fresh = get_pedro_model(tiny_model(), PedroConfig(r=4)).eval()
        fresh.load_state_dict(state, strict=False)
        assert not torch.equal(scaled, before)
        assert torch.equal(scaled, fresh(ids).logits)
        for p in pedro.adapter_parameters():
            p.zero_()
        with pedro.disable_adapter():
            base = pedro(ids).logits
        # w_up = b_up = 0 (and every other weight 0): vectors of exactly 1, the base model
        assert torch.equal(pedro(ids).logits, base)


def test_the_stack_is_checked_for_the_adapters_a_call_reads(monkeypatch):
    """A call checks the cached stack against the adapters its rows use only (a prefill's cost
    does not grow with the adapters loaded); an edit to another adapter is picked up by the
    first call that reads it, and the results always match a freshly built model."""
    from pedro_ext.layer import PedroLayerBank

    def build():
        pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="a")
        pedro.add_adapter("b", PedroConfig(r=3))
        for i, name in enumerate(("a", "b")):
            randomize_adapter(pedro, name, seed=10 + i)
        return pedro.eval()

    pedro, ids = build(), prompts(batch=2)
    stacks = []
    real_stack = PedroLayerBank._stack
    monkeypatch.setattr(PedroLayerBank, "_stack",
                        lambda self, *a, **k: stacks.append(self.layer) or real_stack(self, *a, **k))
    with torch.no_grad():
        pedro(ids, adapter_names=["a", "a"])
        layers = len(stacks)
        assert layers == len(pedro.banks)
        for p in pedro.adapter_parameters("b"):
            p.mul_(2)
        only_a = pedro(ids, adapter_names=["a", "a"]).logits
        assert len(stacks) == layers, "b's edit must not rebuild a call that reads only a"
        mixed = pedro(ids, adapter_names=["a", "b"]).logits
        assert len(stacks) == 2 * layers, "the first call that reads b rebuilds every layer"
        fresh = build()
        for p in fresh.adapter_parameters("b"):
            p.mul_(2)
        assert torch.equal(only_a, fresh(ids, adapter_names=["a", "a"]).logits)
        assert torch.equal(mixed, fresh(ids, adapter_names=["a", "b"]).logits)


def _three_randomized():
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="a")
    for name in ("b", "c"):
        pedro.add_adapter(name, PedroConfig(r=4))
    for i, name in enumerate(("a", "b", "c")):
        randomize_adapter(pedro, name, seed=10 + i)
    return pedro.eval()


@pytest.mark.parametrize("change", ["delete", "add"])
def test_a_stack_built_before_a_bank_change_is_never_used_after_it(change):
    """A thread that stacked the bank before another deleted or added an adapter may write its
    stack last; the next call must still read the adapters of the new order."""
    pedro, ids = _three_randomized(), prompts(batch=2)
    with torch.no_grad():
        pedro(ids, adapter_names=["b", "c"])
        late = {key: bank._cache for key, bank in pedro.banks.items()}
        if change == "delete":
            pedro.delete_adapter("a")
        else:
            pedro.add_adapter("d", PedroConfig(r=4))
            randomize_adapter(pedro, "d", seed=20)
        for key, bank in pedro.banks.items():
            bank._cache = late[key]  # the racing thread's write
        names = ["b", "c"] if change == "delete" else ["c", "d"]
        got = pedro(ids, adapter_names=names).logits
        for bank in pedro.banks.values():
            bank.invalidate()
        assert torch.equal(got, pedro(ids, adapter_names=names).logits)


@pytest.mark.parametrize("change", ["delete", "add"])
def test_changing_adapters_during_a_call_fails_that_call_cleanly(change):
    """A call's adapter ids index the adapters as they were when it started; if another thread
    adds or deletes one meanwhile, the call raises instead of reading another adapter's
    weights, and the next call runs with the new set."""
    pedro, ids = _three_randomized(), prompts(batch=2)
    first = next(iter(pedro.banks.values()))
    hook_layer = pedro.get_base_model().model.layers[first.layer]

    def other_thread(module, args):
        handle.remove()
        if change == "delete":
            pedro.delete_adapter("a")
        else:
            pedro.add_adapter("d", PedroConfig(r=4))

    handle = hook_layer.register_forward_pre_hook(other_thread)
    with torch.no_grad(), pytest.raises(RuntimeError, match="while this call ran"):
        pedro(ids, adapter_names=["b", "c"])
    fresh = _three_randomized()
    if change == "delete":
        fresh.delete_adapter("a")
    else:
        fresh.add_adapter("d", PedroConfig(r=4))
    with torch.no_grad():
        assert torch.equal(pedro(ids, adapter_names=["b", "c"]).logits,
                           fresh(ids, adapter_names=["b", "c"]).logits)


def test_a_deep_copy_edited_in_place_uses_its_own_weights():
    import copy

    pedro, ids = _three_randomized(), prompts(batch=2)
    with torch.no_grad():
        pedro(ids, adapter_names=["a", "a"])
        clone = copy.deepcopy(pedro)
        # edit the copy's weights until their version counters read as the original's: the
        # case where a stack copied with the model would pass the version check
        for p, original in zip(clone.adapter_parameters("a"), pedro.adapter_parameters("a")):
            assert p._version < original._version
            while p._version < original._version:
                p.mul_(1.5)
        got = clone(ids, adapter_names=["a", "a"]).logits
        for bank in clone.banks.values():
            bank.invalidate()
        assert torch.equal(got, clone(ids, adapter_names=["a", "a"]).logits)
        assert not torch.equal(got, pedro(ids, adapter_names=["a", "a"]).logits)


@pytest.mark.parametrize("change", ["cast", "assign"])
def test_casts_and_assigning_loads_rebuild_the_stack(change):
    pedro, ids = _three_randomized(), prompts(batch=2)
    names = ["a", "b"]
    with torch.no_grad():
        before = pedro(ids, adapter_names=names).logits
        if change == "cast":  # the weights round through half precision
            pedro.half()
            pedro.float()
        else:  # new Parameter objects
            state = {k: v * 2 for k, v in pedro.state_dict().items() if ".adapters.b." in k}
            pedro.load_state_dict(state, strict=False, assign=True)
        got = pedro(ids, adapter_names=names).logits
        for bank in pedro.banks.values():
            bank.invalidate()
        want = pedro(ids, adapter_names=names).logits
    assert not torch.equal(want, before) and torch.equal(got, want)


def test_copies_and_pickles_are_independent_models():
    import copy
    import pickle

    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=6)
    pedro.eval()
    ids = prompts()
    with torch.no_grad():
        want = pedro(ids).logits
    for clone in (copy.deepcopy(pedro), pickle.loads(pickle.dumps(pedro))):
        with torch.no_grad():
            assert torch.equal(clone(ids).logits, want)
        base = clone.unload()  # restores the clone's modules, not the original's
        assert not any(isinstance(m, PedroLinear) for m in base.modules())
        assert not any("forward" in vars(m) for m in base.modules())
    assert isinstance(pedro.get_base_model().model.layers[0].self_attn.q_proj, PedroLinear)
    with torch.no_grad():
        assert torch.equal(pedro(ids).logits, want)


# ----------------------------------------------------------------------- calls PEDRO cannot serve
def test_a_decoding_loop_through_forward_raises_for_adapter_rows():
    """A step on a KV cache that holds the prompt would pool the new token alone."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=1)
    ids = prompts()
    with torch.no_grad():
        cache = pedro(ids, use_cache=True).past_key_values
        step = ids[:, -1:]
        for name in ("past_key_values", "cache"):  # (transformers 5's name, and the alias)
            with pytest.raises(ValueError, match="PedroModel.forward was called on a continuation"):
                pedro(step, **{name: cache})
        # base-model rows may continue: nothing is pooled for them
        cache = pedro(ids, adapter_names=[None, None], use_cache=True).past_key_values
        got = pedro(step, past_key_values=cache, adapter_names=[None, None]).logits
        with pedro.disable_adapter():
            want = pedro(torch.cat([ids, step], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_generate_refuses_options_whose_first_pass_is_not_the_prompt():
    """Chunked prefill pooled the first chunk; assisted / prompt-lookup decoding pooled the
    prompt with its draft tokens."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    ids = prompts(length=8)
    with pytest.raises(ValueError, match=r"cannot take prefill_chunk_size=3: it prefills in"):
        pedro.generate(ids, max_new_tokens=2, prefill_chunk_size=3)
    config = transformers.GenerationConfig(max_new_tokens=2, prefill_chunk_size=3)
    with pytest.raises(ValueError, match="cannot take prefill_chunk_size=3"):
        pedro.generate(ids, generation_config=config)
    with pytest.raises(ValueError, match="cannot take prompt_lookup_num_tokens=2: prompt-lookup"):
        pedro.generate(ids, max_new_tokens=2, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="cannot take assistant_model=<LlamaForCausalLM>: assisted decoding"):
        pedro.generate(ids, max_new_tokens=2, assistant_model=tiny_model())


def test_generate_without_a_mask_pools_under_the_mask_hf_infers():
    """HF infers the attention mask from pad_token_id; pooling over the pads instead gave
    other tokens than the same call with the mask given."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=1, scale=2.0)
    pad = 5  # an ordinary token, as SmolLM2's (the tiny model's own pad embeds to zeros)
    ids = prompts(length=7).clamp(min=pad + 1)
    ids[0, :4] = pad  # left-padded first row
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=pad)
    for cache in ({}, dict(cache_implementation="static")):  # (a static cache: 4-D masks)
        with torch.no_grad():
            given = pedro.generate(ids, attention_mask=(ids != pad).long(), **kw, **cache)
            inferred = pedro.generate(ids, **kw, **cache)
        torch.testing.assert_close(torch.stack(inferred.scores), torch.stack(given.scores))
        assert torch.equal(inferred.sequences, given.sequences)


def test_empty_prompts_and_unordered_adapter_names_are_refused():
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="a")
    pedro.add_adapter("b", PedroConfig(r=4))
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\), no positions"):
        pedro(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no positions"):
        pedro.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=1)
    embeds = pedro.get_input_embeddings()(prompts())  # the prompt: no ids needed beside it
    with torch.no_grad():
        out = pedro.generate(input_ids=torch.zeros(2, 0, dtype=torch.long), inputs_embeds=embeds,
                             max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="got a set, which has no order"):
        pedro(prompts(), adapter_names={"a", "b"})


# ----------------------------------------------------------------------- modes, configs, files
def _all_modes(pedro):
    return {m.training for m in pedro.modules()}


def test_wrapping_keeps_the_models_mode_and_loading_for_inference_sets_eval(tmp_path):
    """An adapter with dropout must not drop at inference: a wrapper starts in the wrapped
    model's mode, and from_pretrained / load_adapter without is_trainable end in eval (peft)."""
    ids = prompts()
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4, dropout=0.5))  # tiny_model: eval
    randomize_adapter(pedro, "default", seed=1)
    assert _all_modes(pedro) == {False}
    with torch.no_grad():
        assert torch.equal(pedro(ids).logits, pedro(ids).logits)
    pedro.save_pretrained(str(tmp_path / "ad"))
    assert _all_modes(get_pedro_model(tiny_model().train(), PedroConfig(r=4))) == {True}

    loaded = PedroModel.from_pretrained(tiny_model().train(), str(tmp_path / "ad"))
    assert _all_modes(loaded) == {False}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pedro(ids).logits)
    trainable = PedroModel.from_pretrained(tiny_model().train(), str(tmp_path / "ad"),
                                           is_trainable=True)
    assert _all_modes(trainable) == {True}
    trainable.load_adapter(str(tmp_path / "ad"), "again", is_trainable=True)
    assert _all_modes(trainable) == {True}
    trainable.load_adapter(str(tmp_path / "ad"), "served")
    assert _all_modes(trainable) == {False}


def test_add_adapter_keeps_its_own_copy_of_the_config():
    config = PedroConfig(r=4)
    pedro = get_pedro_model(tiny_model(), config)
    pedro.add_adapter("b", config)
    assert (config.hidden_size, config.num_layers, config.model_type) == (None, None, None)
    assert pedro.peft_config["default"] is not pedro.peft_config["b"]
    assert pedro.peft_config["b"].hidden_size == 48
    other = get_pedro_model(tiny_model(hidden_size=32, intermediate_size=40), config)
    assert other.peft_config["default"].hidden_size == 32


def test_config_fields_are_checked_by_type():
    for field, bad in (("rational_degrees", (5,)), ("rational_degrees", (5, 4.5)), ("r", True),
                       ("dropout", "0.1"), ("pool_norm_affine", "no"),
                       ("rational_trainable", 1), ("layers_to_transform", {0, 1}),
                       ("layers_to_transform", [0, -1]), ("base_model_name_or_path", 3)):
        with pytest.raises(ValueError, match=f"PedroConfig.{field} must be"):
            PedroConfig(**{field: bad})
    assert PedroConfig(layers_to_transform=1).layers_to_transform == [1]  # as peft
    for layers, message in (([5], r"has \[5\], which this model does not have \(its decoder "
                                  r"layers: 0..1\)"), ([], "layers_to_transform is empty")):
        with pytest.raises(ValueError, match=message):
            get_pedro_model(tiny_model(), PedroConfig(layers_to_transform=layers))
    assert list(get_pedro_model(tiny_model(), PedroConfig(layers_to_transform=1)).banks) == [1]
    assert PedroConfig(base_model_name_or_path=pathlib.Path("/m")).base_model_name_or_path == "/m"


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path):
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    pedro.add_adapter("x", PedroConfig(r=4))
    out = tmp_path / "out"
    pedro.save_pretrained(str(out), selected_adapters=["default"])
    before = _files(out)
    randomize_adapter(pedro, "default", seed=3)  # what a second save would write
    (out / "x").write_text("a file where adapter x's folder goes")
    with pytest.raises(OSError):
        pedro.save_pretrained(str(out))
    assert _files(out) == dict(before, x=b"a file where adapter x's folder goes")
    os.remove(out / "x")
    pedro.peft_config["x"].extra["note"] = object()  # not JSON: fails after default's weights
    with pytest.raises(TypeError, match="not JSON serializable"):
        pedro.save_pretrained(str(out))
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    del pedro.peft_config["x"].extra["note"]
    pedro.save_pretrained(str(out))
    assert _files(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert {"x/adapter_config.json", "x/adapter_model.safetensors"} <= set(_files(out))
