"""Training recipe: parameter groups and their learning rates, bi-level rational updates,
loss goes down, best / final checkpoint, metrics log. (DDP: test_train_cli.py.)"""
import dataclasses
import json
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import pedro_ext.train as train_mod
from pedro_ext import PedroConfig, PedroModel, get_pedro_model
from pedro_ext.train import TrainConfig, parameter_groups, train

from tiny_models import CharTokenizer, randomize_adapter, tiny_model, toy_pairs


def _pedro(seed=0, **config):
    return get_pedro_model(tiny_model(seed=seed), PedroConfig(r=4, **config))


def test_bilevel_moves_coefficients_only_on_heldout_steps(monkeypatch):
    pedro = _pedro()
    tok = CharTokenizer()
    train_pairs, dev_pairs = toy_pairs(16, seed=1), toy_pairs(8, seed=2)
    dev_ids = {tuple(train_mod.encode(tok, p, r, 64)["input_ids"]) for p, r in dev_pairs}
    rational = {id(p) for p in pedro.rational_parameters()}
    generator = {id(p) for p in pedro.adapter_parameters()} - rational
    params = {id(p): p for p in pedro.adapter_parameters()}
    events = []
    real_step_loss = train_mod._step_loss

    def spy(model, examples, *a, **k):
        split = "dev" if all(tuple(e["input_ids"]) in dev_ids for e in examples) else "train"
        events.append(("batch", split))
        return real_step_loss(model, examples, *a, **k)

    snapshot = {i: p.detach().clone() for i, p in params.items()}

    def after_step(opt, args, kwargs):
        changed = {i for i, p in params.items() if not torch.equal(p, snapshot[i])}
        events.append(("step", changed))
        for i, p in params.items():
            snapshot[i] = p.detach().clone()

    monkeypatch.setattr(train_mod, "_step_loss", spy)
    handle = register_optimizer_step_post_hook(after_step)
    try:
        train(pedro, tok, train_pairs, dev_pairs,
              TrainConfig(steps=3, batch_size=4, lr=1e-2, rational_lr=1e-2, bilevel_every=1,
                          eval_every=100, max_length=64, progress=False))
    finally:
        handle.remove()
    kinds = [(e[0], e[1] if e[0] == "batch" else None) for e in events]
    assert kinds == [("batch", "train"), ("step", None), ("batch", "dev"), ("step", None)] * 3
    moved_in_training = set()
    for i in range(0, len(events), 4):
        # (at the first step only w_up / b_up move: with w_up = 0 the rest get zero gradient)
        assert events[i + 1][1] and events[i + 1][1] <= generator, "training step: generator only"
        assert events[i + 3][1] and events[i + 3][1] <= rational, "held-out step: coefficients only"
        moved_in_training |= events[i + 1][1]
    assert moved_in_training == generator


def test_frozen_and_joint_modes():
    tok = CharTokenizer()
    for mode, should_move in (("frozen", False), ("joint", True)):
        pedro = _pedro()
        before = [p.detach().clone() for p in pedro.rational_parameters()]
        train(pedro, tok, toy_pairs(8), [], TrainConfig(steps=2, batch_size=4, rational_mode=mode,
                                                         rational_lr=1e-2, progress=False))
        moved = any(not torch.equal(a, b) for a, b in zip(before, pedro.rational_parameters()))
        assert moved == should_move, mode


def test_training_lowers_dev_loss_and_saves_the_best(tmp_path):
    tok = CharTokenizer()
    pedro = _pedro()
    base = {k: v.clone() for k, v in pedro.base_model.state_dict().items() if "pedro" not in k}
    dev = toy_pairs(16, seed=5)
    dev_ex = [train_mod.encode(tok, p, r, 64) for p, r in dev]
    start = train_mod.evaluate(pedro, dev_ex, tok.pad_token_id)
    summary = train(pedro, tok, toy_pairs(64, seed=4), dev,
                    TrainConfig(steps=40, batch_size=8, lr=2e-2, rational_lr=1e-3, eval_every=10,
                                max_length=64, output_dir=str(tmp_path), progress=False))
    assert summary["best_dev_loss"] < start - 0.3, (start, summary["best_dev_loss"])
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert len(lines) == summary["steps"]
    for k, v in pedro.base_model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    reloaded = PedroModel.from_pretrained(tiny_model(), str(tmp_path / "best"))
    got = train_mod.evaluate(reloaded, dev_ex, tok.pad_token_id)
    assert got == pytest.approx(summary["best_dev_loss"], rel=1e-5)


def test_early_stopping_stops():
    summary = train(_pedro(), CharTokenizer(), toy_pairs(8), toy_pairs(4, seed=9),
                    TrainConfig(steps=50, batch_size=4, lr=0.0, static_lr=0.0, rational_lr=0.0,
                                eval_every=1, patience=2, progress=False))
    assert summary["steps"] == 3  # best at step 1, then two evaluations without improvement


def _expected_group(name):
    """The recipe's groups, from the parameter names the wrapper gives them."""
    leaf = name.rsplit(".", 1)[-1]
    return "static" if leaf == "b_up" else "rational" if leaf in ("rat_num", "rat_den") \
        else "generator"


@pytest.mark.parametrize("mode", ["joint", "bilevel"])
def test_each_group_gets_its_learning_rate_and_moves_by_it(mode):
    """AdamW's first step moves a parameter by lr * g / (|g| + eps): every element moves by at
    most its group's lr, and the largest move in each group is that lr."""
    pedro = _pedro(pooling="attention")  # (the attention query is a generator parameter)
    randomize_adapter(pedro, "default", seed=3, scale=0.2)  # every gradient non-zero
    names = {id(p): n for n, p in pedro.named_parameters()}
    params = {names[id(p)]: p for p in pedro.adapter_parameters("default")}
    assert any(n.endswith("att_query") for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    lrs = {"static": 3e-3, "generator": 1e-3, "rational": 2e-4}
    cfg = TrainConfig(steps=1, batch_size=4, lr=lrs["generator"], static_lr=lrs["static"],
                      rational_lr=lrs["rational"], rational_mode=mode, bilevel_every=1,
                      warmup_ratio=0.0, max_length=64, progress=False)
    groups = {g["name"]: g for g in parameter_groups(pedro, "default", cfg)}
    assert {k: g["lr"] for k, g in groups.items()} == lrs
    for kind, g in groups.items():
        assert sorted(names[id(p)] for p in g["params"]) == \
            sorted(n for n in params if _expected_group(n) == kind)
    used = []  # (group name, lr) of every optimizer step
    handle = register_optimizer_step_post_hook(
        lambda opt, a, k: used.append([(g["name"], g["lr"]) for g in opt.param_groups]))
    try:
        train(pedro, CharTokenizer(), toy_pairs(8), toy_pairs(4, seed=7) if mode == "bilevel" else [],
              cfg)
    finally:
        handle.remove()
    if mode == "joint":
        assert used == [[("static", 3e-3), ("generator", 1e-3), ("rational", 2e-4)]]
    else:  # a training step, then a held-out step for the coefficients
        assert used == [[("static", 3e-3), ("generator", 1e-3)], [("rational", 2e-4)]]
    for kind, lr in lrs.items():
        moved = max((params[n] - before[n]).abs().max().item() for n in params
                    if _expected_group(n) == kind)
        assert moved == pytest.approx(lr, rel=1e-3), kind


def test_parameters_the_generator_gains_land_in_the_generator_group():
    from pedro_ext.layer import PedroAdapterWeights
    pedro = _pedro()
    for m in pedro.modules():
        if isinstance(m, PedroAdapterWeights):  # e.g. a norm of the pooled input
            m.register_parameter("pooled_norm_weight", torch.nn.Parameter(torch.ones(3)))
    groups = {g["name"]: g for g in parameter_groups(pedro, "default", TrainConfig())}
    new = [p for m in pedro.modules() if isinstance(m, PedroAdapterWeights)
           for p in [m.pooled_norm_weight]]
    assert len(new) == 2
    assert all(any(p is q for q in groups["generator"]["params"]) for p in new)
    frozen = {g["name"] for g in parameter_groups(pedro, "default", TrainConfig(rational_mode="frozen"))}
    assert frozen == {"static", "generator"}


def test_frozen_mode_restores_requires_grad():
    pedro = _pedro()
    train(pedro, CharTokenizer(), toy_pairs(8), [],
          TrainConfig(steps=1, batch_size=4, rational_mode="frozen", progress=False))
    assert all(p.requires_grad for p in pedro.rational_parameters())


def test_metrics_log_the_learning_rate_each_step_used(tmp_path):
    used = []
    handle = register_optimizer_step_post_hook(
        lambda opt, a, k: used.append({g["name"]: g["lr"] for g in opt.param_groups}))
    try:
        train(_pedro(), CharTokenizer(), toy_pairs(8), [],
              TrainConfig(steps=5, batch_size=4, lr=1e-2, static_lr=2e-2, rational_lr=1e-3,
                          rational_mode="joint", warmup_ratio=0.4, output_dir=str(tmp_path),
                          progress=False))
    finally:
        handle.remove()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    factors = [0.5, 1.0, 1.0, 2 / 3, 1 / 3]  # 2 warm-up steps, then linear decay to the end
    for record, f, step_used in zip(records, factors, used):
        assert record["lr_generator"] == pytest.approx(1e-2 * f)
        assert record["lr_static"] == pytest.approx(2e-2 * f)
        assert record["lr_rational"] == pytest.approx(1e-3 * f)
        assert step_used == {k[3:]: v for k, v in record.items() if k.startswith("lr_")}
    assert len(records) == len(used) == 5


def test_without_dev_the_final_adapter_is_saved(tmp_path):
    tok = CharTokenizer()
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="caps")
    summary = train(pedro, tok, toy_pairs(8), [],
                    TrainConfig(steps=3, batch_size=4, lr=1e-2, rational_mode="joint",
                                output_dir=str(tmp_path), progress=False))
    assert summary["best_dev_loss"] is None and summary["best_step"] is None
    json.dumps({k: v for k, v in summary.items()}, allow_nan=False)  # valid JSON
    assert summary["adapter_dir"] == str(tmp_path / "final" / "caps")
    reloaded = PedroModel.from_pretrained(tiny_model(), summary["adapter_dir"], adapter_name="caps")
    trained = pedro.adapter_state_dict("caps")
    assert any(not torch.equal(v, _pedro().adapter_state_dict("default")[k]) for k, v in trained.items())
    for k, v in reloaded.adapter_state_dict("caps").items():
        assert torch.equal(v, trained[k]), k


def test_train_takes_text_label_rows_and_names_bad_rows():
    pedro = _pedro()
    rows = [{"text": "apple 12", "label": "aaa"}, {"prompt": "berry 3 is", "response": " bbb"},
            ("cherry 4 is", " ccc"), {"text": "dates 5", "label": 3}]
    summary = train(pedro, CharTokenizer(), rows, [],
                    TrainConfig(steps=1, batch_size=4, rational_mode="joint", progress=False))
    assert summary["steps"] == 1
    before = {k: v.clone() for k, v in pedro.adapter_state_dict("default").items()}
    for bad, message in (([("a", "b"), {"prompt": None, "response": "x"}],
                          "train_pairs[1]: 'prompt' must be a string, got None"),
                         ([("a", "b"), {"question": "q"}], "train_pairs[1]: need keys"),
                         ([], "train_pairs is empty")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train(pedro, CharTokenizer(), bad, [], TrainConfig(rational_mode="joint", progress=False))
    with pytest.raises(ValueError, match="needs held-out pairs"):
        train(pedro, CharTokenizer(), rows, [], TrainConfig(progress=False))
    for k, v in pedro.adapter_state_dict("default").items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("lr", float("nan")),
                                          ("static_lr", -1.0), ("warmup_ratio", 2.0),
                                          ("rational_mode", "sometimes"), ("max_length", 1),
                                          ("label_prompt_template", "no text field")])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_metrics_log_the_vector_spread_against_the_static_part(tmp_path):
    tok = CharTokenizer()
    pedro = _pedro()
    dev = toy_pairs(8, seed=7)
    train(pedro, tok, toy_pairs(16, seed=6), dev,
          TrainConfig(steps=4, batch_size=4, lr=5e-2, rational_mode="joint", eval_every=2,
                      max_length=64, output_dir=str(tmp_path), progress=False))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in records if "dev_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("vector_spread" not in r for r in records if "dev_loss" not in r)
    layers = sorted(pedro.banks)
    for r in evals:
        spread = r["vector_spread"]
        assert spread["layers"] == layers and spread["adapter"] == "default"
        assert len(spread["spread_rms"]) == len(spread["static_rms"]) == len(layers)
        assert spread["mean_spread_rms"] == pytest.approx(sum(spread["spread_rms"]) / len(layers))
        # trained w_up / b_up are no longer zero: both parts are visible
        assert min(spread["spread_rms"]) > 0 and min(spread["static_rms"]) > 0


def test_heldout_steps_follow_the_schedule_of_their_optimizer_step(tmp_path):
    """bilevel: the coefficients' lr at a held-out step is the schedule's at the optimizer step
    it follows (it was indexed by the count of held-out steps: a 4x longer warm-up, no decay)."""
    train(_pedro(), CharTokenizer(), toy_pairs(16, seed=1), toy_pairs(8, seed=2),
          TrainConfig(steps=40, batch_size=4, rational_lr=1e-3, bilevel_every=4,
                      warmup_ratio=0.25, eval_every=40, output_dir=str(tmp_path),
                      progress=False))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    heldout = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in heldout] == list(range(4, 41, 4))
    for r in heldout:
        s = r["step"] - 1  # 0-based optimizer step; 10 warm-up steps, then linear decay to 40
        factor = (s + 1) / 10 if s < 10 else (40 - s) / 30
        assert r["lr_rational"] == pytest.approx(1e-3 * factor)
        assert r["lr_generator"] == pytest.approx(TrainConfig().lr * factor)
    assert heldout[-1]["lr_rational"] == pytest.approx(1e-3 / 30)


def test_empty_prompts_are_refused_before_training():
    pedro = _pedro()
    before = {k: v.clone() for k, v in pedro.adapter_state_dict("default").items()}
    with pytest.raises(ValueError, match=re.escape("train_pairs[1]: the prompt is empty")):
        train(pedro, CharTokenizer(), [("apple 1 is", " aaa"), ("", " bbb")], [],
              TrainConfig(steps=2, batch_size=2, rational_mode="joint", progress=False))

    class Silent(CharTokenizer):  # a prompt of spaces tokenises to nothing
        def __call__(self, text, add_special_tokens=False):
            return self._Enc([i for i in super().__call__(text).input_ids if i != 3 + 32 % 94])
    with pytest.raises(ValueError, match=re.escape("dev_pairs[0]: the prompt '   ' tokenises to "
                                                   "no tokens")):
        train(pedro, Silent(), [("apple 1 is", " aaa")], [("   ", " b")],
              TrainConfig(steps=2, batch_size=2, progress=False))
    for k, v in pedro.adapter_state_dict("default").items():
        assert torch.equal(v, before[k])


def test_a_run_that_fails_puts_the_model_back(monkeypatch):
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="a")
    pedro.add_adapter("b", PedroConfig(r=4))
    pedro.set_adapter("a")
    before = {k: v.clone() for k, v in pedro.adapter_state_dict("b").items()}
    flags = [(p, p.requires_grad) for p in pedro.parameters()]
    modes = [(m, m.training) for m in pedro.modules()]
    calls = []
    real = train_mod._step_loss

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, "_step_loss", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        train(pedro, CharTokenizer(), toy_pairs(8), [],
              TrainConfig(steps=5, batch_size=4, lr=1e-1, rational_mode="joint",
                          progress=False), adapter_name="b")
    assert len(calls) == 3  # two steps had changed adapter b
    assert pedro.active_adapter == "a"
    for k, v in pedro.adapter_state_dict("b").items():
        assert torch.equal(v, before[k]), k
    assert [(p, p.requires_grad) for p in pedro.parameters()] == flags
    assert [(m, m.training) for m in pedro.modules()] == modes


def test_an_adapter_loaded_for_inference_is_not_trained(tmp_path):
    pedro = _pedro()
    pedro.save_pretrained(str(tmp_path))
    served = PedroModel.from_pretrained(tiny_model(), str(tmp_path))
    with pytest.raises(ValueError, match="loaded for inference.*is_trainable=True"):
        train(served, CharTokenizer(), toy_pairs(8), [],
              TrainConfig(steps=1, batch_size=4, rational_mode="joint", progress=False))


def test_an_output_dir_with_another_run_is_refused_unless_overwritten(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, rational_mode="joint", output_dir=str(tmp_path),
                      progress=False)
    train(_pedro(), CharTokenizer(), toy_pairs(8), [], cfg)
    assert (tmp_path / "final").is_dir()
    pedro = _pedro()
    before = {k: v.clone() for k, v in pedro.adapter_state_dict("default").items()}
    with pytest.raises(ValueError, match=r"holds another run's files \(metrics.jsonl, final\)"):
        train(pedro, CharTokenizer(), toy_pairs(8), toy_pairs(4, seed=3), cfg)
    for k, v in pedro.adapter_state_dict("default").items():
        assert torch.equal(v, before[k])
    summary = train(pedro, CharTokenizer(), toy_pairs(8), toy_pairs(4, seed=3),
                    dataclasses.replace(cfg, overwrite_output_dir=True))
    assert summary["adapter_dir"] == str(tmp_path / "best")
    assert not (tmp_path / "final").exists()  # the earlier run's adapter is gone, not mixed in
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        train(pedro, CharTokenizer(), toy_pairs(8), [],
              dataclasses.replace(cfg, output_dir=str(tmp_path / "file")))


def test_baselines_read_rows_with_the_configured_templates(monkeypatch):
    seen = {}
    monkeypatch.setattr(train_mod, "_fit", lambda m, t, train_pairs, *a, **k: seen.update(
        pairs=train_pairs))
    cfg = TrainConfig(label_prompt_template="Q: {text}\nA:", label_response_template=" <{label}>")
    train_mod.train_baseline(tiny_model(), CharTokenizer(), [{"text": "hello", "label": "greet"}],
                             [], cfg)
    assert seen["pairs"] == [("Q: hello\nA:", " <greet>")]


@pytest.mark.parametrize("field, value", [("seed", "a"), ("seed", 2 ** 70), ("seed", -1),
                                          ("lr", True), ("warmup_ratio", True),
                                          ("overwrite_output_dir", "yes")])
def test_train_config_checks_types(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})
