"""The quality study's driver (bench/quality) on a tiny random Llama: resumable phases, grid
extension, paired differences, the single-forward test metrics, and the bf16-matmul base."""
import dataclasses
import io
import json
import os
import random

import pytest
import torch

from pedro_ext import PedroConfig, get_pedro_model
from pedro_ext.train import encode, evaluate

from bench.quality import report
from bench.quality.precision import Bf16MatmulLinear, bf16_base_matmuls, gemm_mode
from bench.quality.methods import build, recipe_revision, split_config
from bench.quality.store import run_id
from bench.quality.study import Study, Sweep
from bench.quality.tasks import TaskSpec, score_test_split
from tiny_models import CharTokenizer, randomize_adapter, tiny_model

LABELS = ("a", "b", "c", "d", "e")


def toy_splits(spec, tok):
    rng = random.Random(spec.data_seed)
    words = ["apple", "berry", "cherry", "dates", "elder"]

    def pairs(n):
        return [(f"{w} {rng.randint(10, 99)} is", w[0]) for w in (rng.choice(words) for _ in range(n))]
    return {k: pairs(n) for k, n in spec.splits.items()}


def toy_task(steps=2):
    return TaskSpec("toy", steps=steps, eval_every=1, batch_size=4, max_length=32,
                    splits=dict(train=8, dev=4, test=6), labels=LABELS)


SWEEPS = {
    "pedro": Sweep("lr", (1e-3, 1e-2), {"r": 2}, {"static_lr": ("pedro-static", "lr")}),
    "pedro-static": Sweep("lr", (1e-2,)),
    "lora-qv": Sweep("lr", (1e-3,), {"r": 2}),
}


def make_study(out, steps=2):
    return Study(str(out), {"toy": toy_task(steps)}, SWEEPS, {"last": {"pooling": "last"}},
                 lambda: (tiny_model(), CharTokenizer()), "tiny llama", splits_loader=toy_splits,
                 max_extend=1, log=lambda s: None, run_info={"cpu": "toy cpu"})


def lines(out):
    with open(os.path.join(out, "runs.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_phases_resume_extend_and_pair(tmp_path):
    study = make_study(tmp_path)
    study.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    first = lines(tmp_path)
    # base + every sweep extended by one rung (the best of a grid of 1 or 2 is on an edge)
    assert len(first) == 1 + 3 + 2 * 2
    pedro_lrs = sorted(r["config"]["lr"] for r in first if r["method"] == "pedro")
    assert pedro_lrs in ([3e-4, 1e-3, 1e-2], [1e-3, 1e-2, 3e-2])
    static_best = study.best_config("toy", "pedro-static", study.runs())["lr"]
    assert {r["config"]["static_lr"] for r in first if r["method"] == "pedro"} == {static_best}
    for r in first:  # the generator diagnostic comes with every PEDRO run
        assert ("vector_spread_best" in r) == (r["method"] == "pedro"), r["run_id"]
        assert r["cpu"] == "toy cpu"  # run_info goes into every record
    study.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    assert len(lines(tmp_path)) == len(first)  # finished runs are skipped, not recomputed

    study.run_phase("final", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    study.run_phase("variants", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    runs = study.runs()
    assert len(runs) == len(first) + 3 + 2
    best = study.best_config("toy", "pedro", runs)
    sweep_runs = [r for r in runs.values() if r["method"] == "pedro" and r["seed"] == 0
                  and r.get("variant") is None]
    assert best == min(sweep_runs, key=lambda r: r["best_dev_loss"])["config"]

    rep = report.write(study, study.store.load(), {"cpu": "test"}, str(tmp_path))
    t = rep["tasks"]["toy"]
    p = t["paired_vs_pedro"]["lora-qv"]["test_loss"]
    lora = study.best_config("toy", "lora-qv", runs)
    want = [runs[run_id("toy", "lora-qv", lora, s)]["test_loss"] - runs[run_id("toy", "pedro", best, s)]["test_loss"]
            for s in (0, 1)]
    assert p["n"] == 2 and p["diffs"] == pytest.approx(want)
    assert p["se"] == pytest.approx(abs(want[0] - want[1]) / 2)
    assert t["variants"]["last"]["config"] == {**best, "pooling": "last"}
    assert t["variants"]["last"]["test_accuracy_vs_pedro"]["n"] == 2
    assert {"quality.json", "quality.md", "quality.png"} <= set(os.listdir(tmp_path))

    with pytest.raises(ValueError, match="other settings"):
        make_study(tmp_path, steps=3).store.load()


def test_runs_on_another_platform_are_made_again_and_paired_within_it(tmp_path):
    """A study resumed on a machine with other GEMM arithmetic keeps the choices made, makes the
    runs that are paired again there, and never pairs runs across the two."""
    native = make_study(tmp_path)
    for phase in ("sweep", "final", "variants"):
        native.run_phase(phase, ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    before = lines(tmp_path)
    other = Study(str(tmp_path), {"toy": toy_task()}, SWEEPS, {"last": {"pooling": "last"}},
                  lambda: (tiny_model(seed=1), CharTokenizer()), "tiny llama",
                  splits_loader=toy_splits, max_extend=1, log=lambda s: None,
                  run_info={"cpu": "other cpu", "base_gemm": "bf16 emulated"})
    other.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    assert lines(tmp_path) == before  # the choices stand: no sweep run is made again
    other.run_phase("variants", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    best = native.best_config("toy", "pedro", native.runs())
    new = lines(tmp_path)[len(before):]  # the variant and the PEDRO runs it is paired with
    assert sorted((r["method"], r.get("variant") or "-", r["seed"]) for r in new) == \
        [("pedro", "-", 0), ("pedro", "-", 1), ("pedro", "last", 0), ("pedro", "last", 1)]
    other.run_phase("final", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    new = lines(tmp_path)[len(before):]
    assert len(new) == 4 + 2 * 2 and all(r["base_gemm"] == "bf16 emulated" for r in new)
    merged = other.runs()  # each id's first record: the one the choices were made from
    assert all("base_gemm" not in r for r in merged.values())
    assert other.best_config("toy", "pedro", merged) == best
    here = other.runs(on="bf16 emulated")
    assert len(here) == len(new) and all(r["cpu"] == "other cpu" for r in here.values())

    rep = report.build_report(native, native.store.load(), {})
    t = rep["tasks"]["toy"]
    assert t["platform"] == "bf16 native" and set(t["other_platforms"]) == {"bf16 emulated"}
    sec = t["other_platforms"]["bf16 emulated"]
    there = native.runs(on="bf16 native")
    lora = native.best_config("toy", "lora-qv", merged)

    def loss(runs, method, config, seed):
        return runs[run_id("toy", method, config, seed)]["test_loss"]
    for runs, section in ((there, t), (here, sec)):
        assert section["paired_vs_pedro"]["lora-qv"]["test_loss"]["diffs"] == pytest.approx(
            [loss(runs, "lora-qv", lora, s) - loss(runs, "pedro", best, s) for s in (0, 1)])
        assert section["variants"]["last"]["test_loss_vs_pedro"]["diffs"] == pytest.approx(
            [loss(runs, "pedro", best, s) - loss(runs, "pedro", {**best, "pooling": "last"}, s)
             for s in (0, 1)])
    assert sec["effect_vs_main"]["pedro"]["test_loss"]["diffs"] == pytest.approx(
        [loss(there, "pedro", best, s) - loss(here, "pedro", best, s) for s in (0, 1)])
    def acc(runs, method, config, seed):
        return runs[run_id("toy", method, config, seed)]["test_accuracy"]
    assert sec["effect_vs_main"]["pedro"]["test_accuracy"]["diffs"] == pytest.approx(
        [acc(here, "pedro", best, s) - acc(there, "pedro", best, s) for s in (0, 1)])
    assert sec["cpu"] == ["other cpu"]
    assert "### toy: the runs made with bf16 GEMMs emulated" in report.markdown(rep)

    other.run_phase("final", ["toy"], list(SWEEPS), seeds=3, variant_seeds=2)
    rep = report.build_report(native, native.store.load(), {})  # now the most final runs
    t = rep["tasks"]["toy"]
    assert t["platform"] == "bf16 emulated" and t["final"]["pedro"]["seeds"] == [0, 1, 2]
    assert t["other_platforms"]["bf16 native"]["cpu"] == ["toy cpu"]
    assert t["other_platforms"]["bf16 native"]["effect_vs_main"]["pedro"]["test_loss"]["diffs"] == \
        pytest.approx([loss(here, "pedro", best, s) - loss(there, "pedro", best, s) for s in (0, 1)])

    # a platform with a variant's run but no PEDRO run: nothing to pair it with, not the others'
    copy = dict(next(r for r in lines(tmp_path) if r.get("variant") == "last"),
                base_gemm="bf16 elsewhere")
    with open(os.path.join(tmp_path, "runs.jsonl"), "a") as f:
        f.write(json.dumps(copy) + "\n")
    rep = report.build_report(native, native.store.load(), {})
    alone = rep["tasks"]["toy"]["other_platforms"]["bf16 elsewhere"]
    assert alone["final"] == {} and alone["variants"]["last"]["test_loss_vs_pedro"] is None
    assert "no PEDRO runs here to pair them with" in report.markdown(rep)


def test_task_tuned_on_another_runs_that_tasks_best_configs(tmp_path):
    short = toy_task(2)
    tuned = dataclasses.replace(toy_task(3), name="toy-long", tuned_on="toy")
    assert "tuned_on" not in short.to_dict()  # fingerprints of tasks made before the field stay
    study = Study(str(tmp_path), {"toy": short, "toy-long": tuned}, SWEEPS, {},
                  lambda: (tiny_model(), CharTokenizer()), "tiny llama", splits_loader=toy_splits,
                  max_extend=0, log=lambda s: None)
    study.run_phases(["sweep", "final"], ["toy", "toy-long"], list(SWEEPS), seeds=2, variant_seeds=0)
    runs = study.runs()
    long_runs = [r for r in runs.values() if r["task"] == "toy-long"]
    assert sorted(r["method"] for r in long_runs if r["seed"] == 0) == sorted(["base", *SWEEPS])
    for m in SWEEPS:  # no sweep of its own: the short task's best configuration, at every seed
        best = study.best_config("toy", m, runs)
        assert study.best_config("toy-long", m, runs) == best
        assert sorted(r["seed"] for r in long_runs if r["method"] == m) == [0, 1]
        assert all(r["config"] == best and r["steps"] == 3 for r in long_runs if r["method"] == m)

    rep = report.write(study, study.store.load(), {"cpu": "test"}, str(tmp_path))
    t = rep["tasks"]["toy-long"]
    assert t["sweep"] == {} and set(t["final"]) == set(SWEEPS)
    assert t["paired_vs_pedro"]["lora-qv"]["test_loss"]["n"] == 2
    md = report.markdown(rep)
    assert "its best configuration on toy (same data" in md.split("## toy-long")[1]

    for bad in ("nope", "toy-long"):  # a missing task; a chain of tuned tasks
        with pytest.raises(ValueError, match=f"task toy-long: tuned_on={bad!r}"):
            Study(str(tmp_path / "x"), {"toy": short, "toy-long": dataclasses.replace(tuned, tuned_on=bad)},
                  SWEEPS, {}, None, "m", splits_loader=toy_splits)
    other_data = dataclasses.replace(tuned, splits=dict(train=4, dev=4, test=6))
    with pytest.raises(ValueError, match="same data and splits"):
        Study(str(tmp_path / "y"), {"toy": short, "toy-long": other_data}, SWEEPS, {}, None, "m",
              splits_loader=toy_splits)


def _as_revision_1(out, keep=lambda r: False, shift=lambda r: 0.0):
    """Rewrite runs.jsonl as if PEDRO's bi-level runs had been made before revision 2, their
    test loss 10 higher (told apart from a rerun's) and best dev loss `shift(r)` higher."""
    recs = lines(out)
    for r in recs:
        if r.get("recipe", 1) == 2 and not keep(r):
            del r["recipe"]
            r["run_id"] = run_id(r["task"], r["method"], r["config"], r["seed"])
            r["test_loss"] += 10.0
            r["best_dev_loss"] += shift(r)
    with open(os.path.join(out, "runs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


def test_recipe_revision_marks_the_runs_whose_code_changed():
    assert recipe_revision("pedro", {"lr": 1e-3}) == 2
    assert recipe_revision("pedro", {"rational_mode": "bilevel"}) == 2
    for method, config in (("pedro", {"rational_mode": "frozen"}), ("pedro", {"rational_mode": "joint"}),
                           ("pedro", {"rational_trainable": False}),
                           ("pedro-static", {}), ("lora-qv", {"r": 2}), ("ia3", {})):
        assert recipe_revision(method, config) == 1, (method, config)
    assert run_id("t", "pedro", {"lr": 0.1}, 3) == "t/pedro/lr=0.1/seed3"  # ids of revision 1 unchanged
    assert run_id("t", "pedro", {"lr": 0.1}, 3, 2) == "t/pedro/lr=0.1/seed3/rev2"


def _revision_study(out):
    return Study(str(out), {"toy": toy_task()}, SWEEPS, {"frozen": {"rational_mode": "frozen"}},
                 lambda: (tiny_model(), CharTokenizer()), "tiny llama", splits_loader=toy_splits,
                 max_extend=0, log=lambda s: None)


PHASES = ["sweep", "final", "variants"]


def test_runs_of_an_earlier_revision_are_rerun_and_reported_until_then(tmp_path):
    study = _revision_study(tmp_path)
    study.run_phases(PHASES, ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    made = lines(tmp_path)
    bilevel = [r for r in made if r["method"] == "pedro" and r.get("variant") is None]
    assert bilevel and all(r["recipe"] == 2 and r["run_id"].endswith("/rev2") for r in bilevel)
    frozen = [r for r in made if r.get("variant") == "frozen"]
    assert len(frozen) == 2 and all(r["recipe"] == 1 and "/rev" not in r["run_id"] for r in frozen)

    old = _as_revision_1(tmp_path)
    assert study.best_config("toy", "pedro", study.runs()) is None  # PEDRO's runs no longer count

    def reported():
        rep = report.build_report(study, study.store.load(), {})
        return rep["tasks"]["toy"], report.markdown(rep)
    t, md = reported()
    assert t["pedro_recipe"] == 1 and t["pedro_recipe_current"] == 2 and "of recipe revision 1" in md
    assert t["final"]["pedro"]["seeds"] == [0, 1] and "lora-qv" in t["paired_vs_pedro"]
    assert min(t["final"]["pedro"]["test_loss"]["all"]) > 10  # the earlier revision's numbers
    assert t["variants"]["frozen"]["seeds"] == [0, 1]

    study.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    t, _ = reported()  # a rerun with fewer seeds than the earlier revision does not replace it
    assert t["pedro_recipe"] == 1 and t["final"]["pedro"]["seeds"] == [0, 1]

    study.run_phases(PHASES, ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    now = lines(tmp_path)
    assert now[:len(old)] == old  # appended, nothing rewritten
    rerun = now[len(old):]
    # PEDRO's bi-level runs again (max_extend=0: the same grid and seeds), nothing else
    assert sorted(r["run_id"] for r in rerun) == sorted(r["run_id"] for r in bilevel)
    assert len(study.store.load()) == len(now)  # both revisions kept under their own ids
    t, md = reported()
    assert t["pedro_recipe"] == 2 and "of recipe revision" not in md
    best = t["final"]["pedro"]["config"]
    assert t["final"]["pedro"]["test_loss"]["all"] == [
        r["test_loss"] for r in sorted(rerun, key=lambda r: r["seed"]) if r["config"] == best]
    assert t["compute"]["runs"] == len(now) - 1  # every training run made (not the base model's)


def test_each_platform_reports_the_revision_with_the_most_seeds_there(tmp_path):
    """An earlier revision's results on one platform are not replaced by a rerun made on
    another (the rerun is reported on its own platform)."""
    study = _revision_study(tmp_path)
    study.run_phases(["sweep", "final"], ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    _as_revision_1(tmp_path)
    study.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)  # rev 2, seed 0
    other = Study(str(tmp_path), {"toy": toy_task()}, SWEEPS, study.variants,
                  lambda: (tiny_model(), CharTokenizer()), "tiny llama", splits_loader=toy_splits,
                  max_extend=0, log=lambda s: None, run_info={"base_gemm": "bf16 emulated"})
    other.run_phase("final", ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    t = report.build_report(study, study.store.load(), {})["tasks"]["toy"]
    assert t["platform"] == "bf16 native" and t["pedro_recipe"] == 1
    assert t["final"]["pedro"]["seeds"] == [0, 1]
    assert min(t["final"]["pedro"]["test_loss"]["all"]) > 10  # revision 1's
    sec = t["other_platforms"]["bf16 emulated"]
    assert sec["pedro_recipe"] == 2 and sec["final"]["pedro"]["seeds"] == [0, 1]
    assert max(sec["final"]["pedro"]["test_loss"]["all"]) < 10
    assert "pedro" not in sec["effect_vs_main"] and "lora-qv" in sec["effect_vs_main"]


def test_variants_of_another_configuration_are_not_reported(tmp_path):
    study = _revision_study(tmp_path)
    study.run_phases(PHASES, ["toy"], list(SWEEPS), seeds=2, variant_seeds=2)
    best = study.best_config("toy", "pedro", study.runs())
    # the earlier revision's sweep chose another lr: the frozen variants (of `best`) are not its
    _as_revision_1(tmp_path, shift=lambda r: 10.0 if r["config"] == best else 0.0)
    rep = report.build_report(study, study.store.load(), {})
    t = rep["tasks"]["toy"]
    assert t["pedro_recipe"] == 1 and t["final"]["pedro"]["config"]["lr"] != best["lr"]
    assert t["variants"] == {} and set(t["vector_spread"]) == {"pedro"}
    assert "| frozen |" not in report.markdown(rep)


def test_a_tuned_task_may_take_its_configuration_from_an_earlier_revisions_sweep(tmp_path):
    tuned = dataclasses.replace(toy_task(3), name="toy-long", tuned_on="toy")
    study = Study(str(tmp_path), {"toy": toy_task(2), "toy-long": tuned}, SWEEPS, {},
                  lambda: (tiny_model(), CharTokenizer()), "tiny llama", splits_loader=toy_splits,
                  max_extend=0, log=lambda s: None)
    study.run_phases(["sweep", "final"], ["toy", "toy-long"], list(SWEEPS), seeds=2, variant_seeds=0)
    _as_revision_1(tmp_path, keep=lambda r: r["task"] == "toy-long")  # toy's sweep: revision 1
    rep = report.build_report(study, study.store.load(), {})
    long, short = rep["tasks"]["toy-long"], rep["tasks"]["toy"]
    assert (long["pedro_recipe"], long["pedro_recipe_tuned"]) == (2, 1)
    assert long["final"]["pedro"]["seeds"] == [0, 1]
    assert short["pedro_recipe"] == 1
    md = report.markdown(rep).split("## toy-long")[1]
    assert "chosen by its sweep on toy at recipe revision 1, its runs are of revision 2" in md
    assert "of recipe revision 1 (" not in md
    study.run_phase("sweep", ["toy"], list(SWEEPS), seeds=2, variant_seeds=0)
    rep = report.build_report(study, study.store.load(), {})  # both of toy's sweeps choose alike:
    long = rep["tasks"]["toy-long"]                             # the runs' own revision is named
    assert (long["pedro_recipe"], long["pedro_recipe_tuned"]) == (2, 2)
    assert "recipe revision" not in report.markdown(rep).split("## toy-long")[1]


def _scoring_model():
    """A tiny PEDRO model whose vectors vary with the prompt, and its tokenizer."""
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=2))
    with torch.no_grad():
        for bank in pedro.banks.values():
            bank.adapters["default"].w_up.normal_(0, 0.3)
    return pedro, CharTokenizer()


def test_test_metrics_match_independent_evaluation():
    pedro, tok = _scoring_model()
    spec = toy_task()
    pairs = toy_splits(dataclasses.replace(spec, splits=dict(test=13)), tok)["test"]
    got = score_test_split(pedro, tok, pairs, spec, batch_size=4)
    examples = [encode(tok, p, r, spec.max_length) for p, r in pairs]
    assert got["test_loss"] == pytest.approx(evaluate(pedro, examples, tok.pad_token_id), rel=1e-5)
    correct = 0
    label_ids = [tok(w).input_ids[0] for w in LABELS]
    for p, r in pairs:  # one prompt at a time, nothing padded
        ids = torch.tensor([tok(p).input_ids])
        with torch.no_grad():
            logits = pedro(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        correct += LABELS[int(logits[label_ids].argmax())] == r
    assert got["test_accuracy"] == correct / len(pairs)


def test_mixed_test_split_scores_accuracy_on_labelled_items_and_loss_per_part():
    """The mix task's test split holds labelled (classification) and free-text items: accuracy
    counts the labelled ones only, and each part's loss is its own mean over its tokens."""
    pedro, tok = _scoring_model()
    spec = toy_task()
    labelled = toy_splits(dataclasses.replace(spec, splits=dict(test=7)), tok)["test"]
    free = [(f"say {w}", f" {w} again") for w in ("hi", "ok then", "fine", "x", "bye now")]
    pairs = [labelled[0], free[0], free[1], *labelled[1:4], free[2], free[3], *labelled[4:], free[4]]
    got = score_test_split(pedro, tok, pairs, spec, batch_size=4)
    part = {k: [encode(tok, p, r, spec.max_length) for p, r in ps]
            for k, ps in (("labelled", labelled), ("other", free), ("all", pairs))}
    for key, name in (("test_loss", "all"), ("test_loss_labelled", "labelled"),
                      ("test_loss_other", "other")):
        assert got[key] == pytest.approx(evaluate(pedro, part[name], tok.pad_token_id), rel=1e-5)
    alone = score_test_split(pedro, tok, labelled, spec, batch_size=3)
    assert got["test_accuracy"] == alone["test_accuracy"]
    assert "test_loss_other" not in alone


def test_mix_task_splits_half_bbc_half_chat():
    from bench.quality import data
    from bench.quality.tasks import TASKS, load_splits
    from pedro_ext.offline import load_smollm2
    _, tok = load_smollm2()
    spec = TASKS["mix"]
    splits = load_splits(spec, tok)
    for name, n in spec.splits.items():
        is_bbc = [r in spec.labels for _, r in splits[name]]
        assert len(splits[name]) == n and sum(is_bbc) == n // 2, name
    test_bbc = [r for _, r in splits["test"] if r in spec.labels]
    assert sorted(set(test_bbc)) == sorted(spec.labels)
    assert all(test_bbc.count(r) == len(test_bbc) // len(data.BBC_LABELS) for r in spec.labels)
    # (the BBC corpus repeats a few articles, so its parts may share a handful of items, as in
    # the bbc task; the chat part is drawn without replacement)
    chat = {name: {p for p in pairs if p[1] not in spec.labels} for name, pairs in splits.items()}
    assert not (chat["train"] & chat["test"]) and not (chat["dev"] & chat["test"])


def test_bf16_matmuls_round_only_the_gemm():
    model = tiny_model(tie_word_embeddings=True)
    x = torch.randn(2, 5, 48)
    ref = {n: m(x).detach() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and m.in_features == 48}
    bf16_base_matmuls(model)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying kept
    for name, want in ref.items():
        m = model.get_submodule(name)
        assert isinstance(m, Bf16MatmulLinear)
        got = m(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
        with torch.no_grad():
            exact = m(x)
        if name == "lm_head":  # fp32 whenever gradients are off (every evaluation)
            torch.testing.assert_close(exact, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(exact, got)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        model.lm_head(x)


def test_emulated_bf16_gemms_round_as_native_ones():
    """The emulated mode (bf16-rounded operands, fp32 GEMM, bf16-rounded result; the same in
    the backward pass) against a float64 reference of those roundings, and against native bf16
    GEMMs, which differ from it in the order of summation only."""
    def bf16(t):
        return t.to(torch.bfloat16).to(t.dtype)

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    w = bf16(linear.weight.detach().double())
    layer = bf16_base_matmuls(torch.nn.Sequential(linear), mode="emulated")[0]
    x = torch.randn(3, 7, 96, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    want_y = bf16(bf16(x.detach().double()) @ w.T).float()
    want_gx = bf16(bf16(grad_y.double()) @ w).float()
    for got, want in ((y.detach(), want_y), (x.grad, want_gx)):
        assert got.dtype == torch.float32 and torch.equal(got, bf16(got))  # bf16 values
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=0)  # at most one bf16 step
        assert (got == want).float().mean() > 0.95  # and mostly none

    models = {mode: bf16_base_matmuls(tiny_model(), mode=mode) for mode in ("native", "emulated")}
    assert models["emulated"].lm_head.weight_bf16.dtype == torch.float32
    ids = torch.randint(0, 97, (3, 9))
    out, grads = {}, {}
    for mode, model in models.items():
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits
        logits.float().pow(2).mean().backward()
        out[mode], grads[mode] = logits.detach(), emb.grad
    for got, want in ((out["emulated"], out["native"]), (grads["emulated"], grads["native"])):
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-6 * want.abs().max().item())
    x = torch.randn(4, 48)
    with torch.no_grad():  # the head stays exact fp32 in evaluation in both modes
        torch.testing.assert_close(models["emulated"].lm_head(x), tiny_model().lm_head(x),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        bf16_base_matmuls(tiny_model(), mode="fp16")
    assert gemm_mode("flags : fpu avx2 avx512f avx512_bf16") == "native"
    assert gemm_mode("flags : fpu avx2 amx_bf16 amx_tile") == "native"
    assert gemm_mode("flags : fpu avx2 avx512f") == "emulated"


def test_prompt_blind_control_keeps_pedro_but_not_the_prompt():
    """The prompt-blind variant: PEDRO's parameters and training, every prompt the same vectors."""
    config = {"r": 4, "pool_norm": "rms", "prompt_blind": True, "lr": 1e-3}
    adapter, training = split_config("pedro", config)
    assert adapter == {"r": 4, "pool_norm": "rms", "prompt_blind": True} and training == {"lr": 1e-3}
    with pytest.raises(ValueError, match="unknown config key 'prompt_blind'"):
        split_config("pedro-static", config)
    assert recipe_revision("pedro", config) == 2
    ids = torch.tensor([[5, 9, 13, 40, 41, 42], [60, 61, 3, 4, 90, 7]])
    vectors = {}
    for blind in (False, True):
        net, _, hyper = build("pedro", tiny_model(), {**adapter, "prompt_blind": blind})
        assert hyper.get("prompt_blind", False) == blind
        randomize_adapter(net, "default", seed=1)
        vectors[blind] = net.prompt_vectors(ids)
        net.train()
        net(input_ids=ids, labels=ids).loss.backward()
        generator = {n: p.grad for n, p in net.named_parameters()
                     if n.rsplit(".", 1)[-1] in ("w_down", "b_down", "w_up", "b_up")}
        assert {n.rsplit(".", 1)[-1] for n in generator} == {"w_down", "b_down", "w_up", "b_up"}
        assert all(g is not None and g.abs().sum() > 0 for g in generator.values()), blind
        if blind:  # a saved and reloaded model stays blind
            buf = io.BytesIO()
            torch.save(net, buf)
            buf.seek(0)
            reloaded = torch.load(buf, weights_only=False)
            for layer, v in reloaded.eval().prompt_vectors(ids).items():
                torch.testing.assert_close(v, vectors[True][layer])
    for layer, v in vectors[True].items():  # the same for both prompts, unlike PEDRO's
        torch.testing.assert_close(v[0], v[1])
        assert not torch.allclose(vectors[False][layer][0], vectors[False][layer][1])
        assert not torch.allclose(v[0], torch.ones_like(v[0]))  # not the identity either


def test_claims_share_runs_between_workers(tmp_path):
    import subprocess
    import sys
    from bench.quality.store import Claims
    claims = Claims(str(tmp_path / "claims"))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = claims._path("t/m/-/seed0")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(str(other.pid))
        assert claims.acquire("t/m/-/seed0") == other.pid  # a live worker holds it
        assert claims.active()
    finally:
        other.kill()
        other.wait()
    assert claims.acquire("t/m/-/seed0") is None  # its worker is gone: taken over
    assert claims.acquire("t/m/-/seed1") is None
    claims.release("t/m/-/seed0")
    claims.release("t/m/-/seed1")
    assert not claims.active() and os.listdir(tmp_path / "claims") == []

    study = make_study(tmp_path / "study")
    rid = run_id("toy", "base", {}, 0)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = study.claims._path(rid)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(str(holder.pid))
        assert study._ensure("toy", "base", {}, 0, "sweep") is False  # held elsewhere: skipped
        assert study.store.load() == {}
    finally:
        holder.kill()
        holder.wait()
    assert study._ensure("toy", "base", {}, 0, "sweep") is True
    assert list(study.store.load()) == [rid]

    config = {"lr": 1e-3, "r": 2, "static_lr": 1e-2}  # a revision-2 run is claimed under its own id
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(study.claims._path(run_id("toy", "pedro", config, 0, 2)), "w") as f:
            f.write(str(holder.pid))
        assert study._ensure("toy", "pedro", config, 0, "sweep") is False
    finally:
        holder.kill()
        holder.wait()
    assert study._ensure("toy", "pedro", config, 0, "sweep") is True
    assert list(study.store.load()) == [rid, run_id("toy", "pedro", config, 0, 2)]
