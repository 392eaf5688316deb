"""PedroModel on tiny random Hugging Face models."""
import json
import os

import pytest
import torch
import transformers

from pedro_ext import PedroConfig, PedroModel, get_pedro_model

from tiny_models import ARCHS, randomize_adapter, tiny_model


def prompts(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, length), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_exactly_the_base_model(arch, dtype):
    model = tiny_model(arch).to(dtype)
    ids = prompts()
    with torch.no_grad():
        base = model(ids).logits
    pedro = get_pedro_model(model, PedroConfig(r=4))
    with torch.no_grad():
        assert torch.equal(pedro(ids).logits, base)


def _three_adapters(arch="llama"):
    pedro = get_pedro_model(tiny_model(arch), PedroConfig(r=4), adapter_name="a")
    pedro.add_adapter("b", PedroConfig(r=7, pooling="attention", rational_degrees=(6, 5)))
    pedro.add_adapter("c", PedroConfig(r=2, pooling="last", rational_init="identity"))
    for i, name in enumerate(["a", "b", "c"]):
        randomize_adapter(pedro, name, seed=10 + i)
    return pedro.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_row_alone(arch):
    pedro = _three_adapters(arch)
    ids = prompts(batch=6)
    names = ["a", None, "b", "c", "__base__", "b"]
    with torch.no_grad():
        mixed = pedro(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = pedro(ids[row:row + 1], adapter_names=[name]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
        with pedro.disable_adapter():
            base = pedro(ids).logits
    assert torch.equal(mixed[[1, 4]], base[[1, 4]]), "base-model rows must be the bare model's"
    assert (mixed[0] - base[0]).abs().max() > 1e-3, "the adapter should change the output"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_pools_only_real_prompt_tokens(side):
    pedro = _three_adapters()
    lengths = [7, 4, 5]
    rows = [prompts(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    t = max(lengths)
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(t - len(row), t) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, 1
    names = ["a", "b", "c"]
    with torch.no_grad():
        batch = pedro(ids, attention_mask=mask, adapter_names=names).logits
        for i, row in enumerate(rows):
            alone = pedro(row[None], adapter_names=[names[i]]).logits[0]
            real = mask[i].bool()
            torch.testing.assert_close(batch[i][real], alone, rtol=1e-4, atol=1e-4)


def test_generate_reuses_prompt_vectors_and_matches_a_no_cache_loop():
    pedro = _three_adapters()
    ids = prompts(batch=4, length=6)
    names = ["a", "b", None, "c"]
    before = pedro.vector_computations
    out = pedro.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                         max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert pedro.vector_computations - before == len(pedro.banks), "vectors once per prompt"
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(6):  # vectors from the prompt only: pool over the first 6 positions
            prompt_mask = torch.zeros_like(seq, dtype=torch.bool)
            prompt_mask[:, :ids.shape[1]] = True
            logits = pedro(seq, adapter_names=names, prompt_mask=prompt_mask, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_with_beams_runs_and_counts_once():
    pedro = _three_adapters()
    ids = prompts(batch=2, length=5)
    before = pedro.vector_computations
    out = pedro.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=["a", "b"],
                         max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2
    assert pedro.vector_computations - before == len(pedro.banks)


def test_prompt_lengths_equals_prompt_mask():
    pedro = _three_adapters()
    ids = prompts(batch=2, length=8)
    mask = torch.ones_like(ids)
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[0, :3], pm[1, :5] = True, True
    with torch.no_grad():
        a = pedro(ids, attention_mask=mask, adapter_names=["a", "b"], prompt_mask=pm).logits
        b = pedro(ids, attention_mask=mask, adapter_names=["a", "b"], prompt_lengths=[3, 5]).logits
        c = pedro(ids, attention_mask=mask, adapter_names=["a", "b"]).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_adding_and_deleting_adapters_leaves_others_unchanged():
    pedro = _three_adapters()
    ids = prompts()
    with torch.no_grad():
        before = pedro(ids, adapter_names=["a", "b", "c"]).logits
        pedro.add_adapter("d", PedroConfig(r=3, pooling="max"))
        randomize_adapter(pedro, "d", 99)
        pedro.eval()
        after_add = pedro(ids, adapter_names=["a", "b", "c"]).logits
        pedro.delete_adapter("a")
        after_del = pedro(ids[1:], adapter_names=["b", "c"]).logits
    assert torch.equal(before, after_add)
    torch.testing.assert_close(before[1:], after_del, rtol=1e-6, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    pedro = _three_adapters()
    ids = prompts()
    with torch.no_grad():
        expected = pedro(ids, adapter_names=["a", "b", "c"]).logits
    pedro.save_pretrained(str(tmp_path), selected_adapters=["a", "b"])
    pedro.save_pretrained(str(tmp_path / "c_dir"), selected_adapters=["c"])
    for sub in ["a", "b"]:
        assert os.path.isfile(tmp_path / sub / "adapter_config.json")
        assert os.path.isfile(tmp_path / sub / "adapter_model.safetensors")
    cfg = json.load(open(tmp_path / "b" / "adapter_config.json"))
    assert cfg["peft_type"] == "PEDRO" and cfg["pooling"] == "attention" and cfg["r"] == 7

    fresh = tiny_model()
    loaded = PedroModel.from_pretrained(fresh, str(tmp_path / "a"), adapter_name="a")
    loaded.add_adapter("other", PedroConfig(r=5))
    randomize_adapter(loaded, "other", 5)
    loaded.eval()
    with torch.no_grad():
        other_before = loaded(ids, adapter_names=["other"] * 3).logits
    loaded.load_adapter(str(tmp_path / "b"), "b")
    loaded.load_adapter(str(tmp_path / "c_dir" / "c"), "c")
    loaded.eval()
    with torch.no_grad():
        got = loaded(ids, adapter_names=["a", "b", "c"]).logits
        other_after = loaded(ids, adapter_names=["other"] * 3).logits
    assert torch.equal(got, expected)
    assert torch.equal(other_before, other_after)
    assert not any(p.requires_grad for p in loaded.adapter_parameters("b"))


def test_matches_peft_ia3_when_vectors_are_constant():
    peft = pytest.importorskip("peft")
    ids = prompts()
    c = {}
    g = torch.Generator().manual_seed(3)
    ia3 = peft.get_peft_model(tiny_model(), peft.IA3Config(
        target_modules=["q_proj", "v_proj", "up_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for name, module in ia3.named_modules():
            if hasattr(module, "ia3_l") and "default" in module.ia3_l:
                vec = module.ia3_l["default"]
                vec.copy_(1 + 0.3 * torch.randn(vec.shape, generator=g))
                c[name] = vec.detach().flatten().clone()
        want = ia3(input_ids=ids).logits
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=3)).eval()
    with torch.no_grad():
        for idx, bank in pedro.banks.items():
            w = bank.adapters["default"]
            parts = [c[k] for t in ["q_proj", "v_proj", "up_proj"] for k in c
                     if f"layers.{idx}." in k and k.endswith(t)]
            w.w_down.normal_()  # irrelevant when w_up is zero
            w.b_up.copy_(torch.cat(parts) - 1)
        got = pedro(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _lm_batch(batch=8, length=12, seed=0):
    ids = prompts(batch, length, seed)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def test_training_lowers_loss_and_keeps_base_weights():
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pedro = get_pedro_model(model, PedroConfig(r=8)).train()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "pedro_bank" not in n)
    opt = torch.optim.AdamW([p for p in pedro.parameters() if p.requires_grad], lr=3e-2)
    batch = _lm_batch()
    losses = []
    for _ in range(25):
        loss = pedro(**batch, prompt_lengths=[6] * 8).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    unloaded = pedro.unload()
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _lm_batch()
    grads = []
    for ckpt in (False, True):
        pedro = get_pedro_model(tiny_model(), PedroConfig(r=4)).train()
        randomize_adapter(pedro, "default", 4)
        if ckpt:
            pedro.gradient_checkpointing_enable()
        loss = pedro(**batch).loss
        n = pedro.vector_computations
        loss.backward()
        recomputed = pedro.vector_computations - n
        assert recomputed == (len(pedro.banks) if ckpt else 0), "checkpointing recomputes layers"
        grads.append([p.grad.clone() for p in pedro.adapter_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_multi_task_batch_gives_each_adapter_only_its_rows_gradients():
    pedro = _three_adapters().train()
    pedro.set_requires_grad(["a", "b"])
    batch = _lm_batch(batch=4)
    names = ["a", "b", "a", "b"]

    def grads_for(rows):
        for p in pedro.parameters():
            p.grad = None
        sub = {k: v[rows] for k, v in batch.items()}
        logits = pedro(**{k: v for k, v in sub.items() if k != "labels"},
                       adapter_names=[names[i] for i in rows]).logits
        logits.float().pow(2).mean(-1).sum().backward()  # a per-row-additive loss
        return {n: [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                    for p in pedro.adapter_parameters(n)] for n in ["a", "b"]}

    mixed = grads_for([0, 1, 2, 3])
    only_a = grads_for([0, 2])
    only_b = grads_for([1, 3])
    for x, y in zip(mixed["a"], only_a["a"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    for x, y in zip(mixed["b"], only_b["b"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert all(torch.all(g == 0) for g in only_a["b"])


def test_training_stacks_only_the_batchs_adapters(monkeypatch):
    """A training step's bank holds the adapters its rows use: the backward writes gradients
    for those alone (an unused adapter's stay None: no decay, no momentum step), and each used
    adapter's gradients are the ones it gets in a batch of its own rows (float64)."""
    from pedro_ext import layer
    pedro = _three_adapters().double().train()
    pedro.set_requires_grad(["a", "b", "c"])
    batch = _lm_batch(batch=4)
    generate, bank_sizes = layer._OPS["generate"], []

    def recording(pooled, ids, w_down, *rest, **kw):
        bank_sizes.append(w_down.shape[0])
        assert ids.max() < w_down.shape[0]
        return generate(pooled, ids, w_down, *rest, **kw)

    monkeypatch.setitem(layer._OPS, "generate", recording)

    def grads(names):
        pedro.zero_grad(set_to_none=True)
        rows = [i for i, n in enumerate(["c", None, "a", "c"]) if n in names or n is None]
        sub = {k: v[rows] for k, v in batch.items() if k != "labels"}
        logits = pedro(**sub, adapter_names=[["c", None, "a", "c"][i] for i in rows]).logits
        logits.pow(2).mean(-1).sum().backward()  # a per-row-additive loss
        return {n: [p.grad for p in pedro.adapter_parameters(n)] for n in ["a", "b", "c"]}

    mixed = grads({"a", "c"})
    layers = len(pedro.get_base_model().model.layers)
    assert bank_sizes == [2] * layers
    assert all(g is None for g in mixed["b"])
    for name in ("a", "c"):
        bank_sizes.clear()
        alone = grads({name})
        assert bank_sizes == [1] * layers
        for x, y in zip(mixed[name], alone[name]):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        assert any(x is not None and x.abs().sum() > 0 for x in mixed[name])


def test_serving_never_builds_the_training_banks_ids(monkeypatch):
    """The batch-only bank's remapped ids are training's: an inference call never computes
    them (no work, no host-to-device copies), a training call does."""
    from pedro_ext import routing

    def refuse(plan):
        raise AssertionError("RowPlan.local computed")

    monkeypatch.setattr(routing.RowPlan, "local", property(refuse))
    pedro = _three_adapters()
    batch = _lm_batch(batch=3)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  adapter_names=["a", None, "c"])
    with torch.no_grad():
        pedro(**inputs)
    pedro.set_requires_grad(["a", "c"])
    with pytest.raises(AssertionError, match="RowPlan.local computed"):
        pedro.train()(**inputs)


def test_mixed_batch_training_under_ddp_with_unused_adapters(tmp_path):
    """Steps that use different subsets of the trainable adapters, under DistributedDataParallel
    (gloo, one rank, find_unused_parameters=True as set_requires_grad's docstring says): every
    step reduces, and the gradients are the unwrapped model's."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    batch = _lm_batch(batch=4)
    steps = [["c", None, "a", "c"], ["b", "b", None, "a"], ["a", "a", "a", "a"]]

    def grads_per_step(wrap):
        pedro = _three_adapters().double().train()
        pedro.set_requires_grad(["a", "b", "c"])
        model = wrap(pedro)
        out = []
        for names in steps:
            pedro.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           adapter_names=names).logits
            logits.pow(2).mean().backward()
            out.append({n: [None if p.grad is None else p.grad.clone()
                            for p in pedro.adapter_parameters(n)] for n in "abc"})
        return out

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = grads_per_step(lambda m: torch.nn.parallel.DistributedDataParallel(
            m, find_unused_parameters=True))
    finally:
        dist.destroy_process_group()
    plain = grads_per_step(lambda m: m)
    for names, w, p in zip(steps, wrapped, plain):
        for n in "abc":
            if n not in names:
                assert all(g is None for g in p[n])
            for x, y in zip(w[n], p[n]):
                if y is None:
                    assert x is None or not x.any()  # DDP may hand unused parameters zeros
                else:
                    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_transformers_trainer_trains(tmp_path):
    from torch.utils.data import Dataset

    class Data(Dataset):
        def __init__(self):
            self.b = _lm_batch(batch=16)

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.b.items()}

    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    before = [p.clone() for p in pedro.adapter_parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          max_steps=4, learning_rate=1e-2, save_strategy="no",
                                          report_to=[], use_cpu=True, logging_steps=1)
    trainer = transformers.Trainer(model=pedro, args=args, train_dataset=Data())
    trainer.train()
    after = list(pedro.adapter_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def _trainer_trained_adapter(tmp_path, **args):
    from torch.utils.data import Dataset

    batch = _lm_batch(batch=8)

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items()}

    torch.manual_seed(0)
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    randomize_adapter(pedro, "default", seed=3)  # w_up != 0: every generator weight gets gradient
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                           max_steps=2, learning_rate=1e-2, save_strategy="no",
                                           report_to=[], use_cpu=True, seed=0, **args)
    transformers.Trainer(model=pedro, args=targs, train_dataset=Data()).train()
    return [p.detach().clone() for p in pedro.adapter_parameters()]


def test_transformers_trainer_with_gradient_checkpointing_trains_the_same(tmp_path):
    plain = _trainer_trained_adapter(tmp_path / "plain")
    ckpt = _trainer_trained_adapter(tmp_path / "ckpt", gradient_checkpointing=True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unload_and_merge():
    model = tiny_model()
    linear = model.model.layers[0].self_attn.q_proj
    pedro = get_pedro_model(model, PedroConfig())
    for merge in (pedro.merge_and_unload, pedro.merge_adapter, pedro.unmerge_adapter):
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            merge()
    base = pedro.unload()
    assert base.model.layers[0].self_attn.q_proj is linear


def test_print_trainable_parameters(capsys):
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4))
    pedro.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = pedro.get_nb_trainable_parameters()
    # per layer: w_down 48*4, b_down 4, rational 6+4, w_up 4*D, b_up D; D = 48 + 24 + 88
    big_d = 48 + 24 + 88
    assert trainable == 2 * (48 * 4 + 4 + 10 + 4 * big_d + big_d)
    assert out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%:")


# ----------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tmp_path):
    pedro = _three_adapters()
    ids = prompts()
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        pedro(ids, adapter_names=["a", "zzz", None])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        pedro(ids, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="unknown adapter"):
        pedro.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        pedro.add_adapter("a", PedroConfig())
    pedro.save_pretrained(str(tmp_path), selected_adapters=["a"])
    other_shape = get_pedro_model(tiny_model(hidden_size=32, intermediate_size=64), PedroConfig())
    with pytest.raises(ValueError, match="hidden_size=48"):
        other_shape.load_adapter(str(tmp_path / "a"), "a2")
    # same config, wrong tensor shapes
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    cfg["hidden_size"] = None
    json.dump(cfg, open(tmp_path / "a" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="has shape"):
        other_shape.load_adapter(str(tmp_path / "a"), "a2")
    assert "a2" not in other_shape.peft_config
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pedro.load_adapter(str(tmp_path / "a"), "a3")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        pedro.load_adapter(str(tmp_path / "a"), "a3")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pedro.load_adapter(str(tmp_path / "missing"), "a3")
    with pytest.raises(ValueError, match="pooling must be one of"):
        PedroConfig(pooling="median")


def test_unsupported_architecture_needs_target_modules():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="no default target modules for model_type='gpt2'"):
        get_pedro_model(model, PedroConfig())
