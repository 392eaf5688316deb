"""quality.json / quality.md / quality.png from runs.jsonl (everything recomputed from the runs,
nothing trained here).

Paired differences: for PEDRO against a baseline, the per-seed differences d_s = PEDRO_s - B_s
over the seeds both have (same seed = same data order and the same test items), reported as
mean and standard error sd(d) / sqrt(n). Signs are PEDRO minus baseline for accuracy (higher is
better) and baseline minus PEDRO for response loss (lower is better): positive always means
PEDRO is ahead.

Each task is reported from the current revision of every method's training code
(methods.recipe_revision), except PEDRO's where an earlier revision has final runs at more seeds
(a rerun not finished): then the task says which revision it shows.

Pairs never cross platforms (store.platform): a task's tables show the platform with the most
final runs; runs made on another platform (replicates on a machine without bf16 GEMMs, say) get
tables of their own, paired within it, and the platform's effect on a method: its result there
minus its result on the main platform, same seeds.
"""
import json
import os
import statistics
from typing import Dict, List, Optional

from .methods import recipe_revision
from .store import NATIVE, platform, run_id

METRICS = (("test_accuracy", +1), ("test_loss", -1))  # (key, sign that makes "ahead" positive)


def _mean_std(vals: List[float]) -> dict:
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "all": vals}


def paired(a: Dict[int, dict], b: Dict[int, dict], key: str, sign: int) -> Optional[dict]:
    """sign * (a - b) per common seed: mean, standard error, n, and the seeds used."""
    seeds = sorted(s for s in a if s in b and key in a[s] and key in b[s])
    if not seeds:
        return None
    d = [sign * (a[s][key] - b[s][key]) for s in seeds]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
    return {"mean": statistics.mean(d), "se": se, "n": len(d), "seeds": seeds, "diffs": d,
            "ahead_by_2se": (se is not None and statistics.mean(d) > 2 * se)}


def _pedro_final_seeds(study, task: str, runs: Dict[str, dict], counted: Dict[str, dict]) -> int:
    """PEDRO's final seeds in `counted` at the configuration chosen from `runs`."""
    best = study.best_config(task, "pedro", runs)
    return 0 if best is None else sum(r["task"] == task and r["method"] == "pedro" and r["config"] == best
                                      for r in counted.values())


def _revision_view(study, records: Dict[str, dict], task: str, revision: int, tuned: int,
                   on: Optional[str] = None) -> Dict[str, dict]:
    """Study.view with PEDRO's runs of `revision`, and of `tuned` on the task the configuration
    is taken from."""
    source = study.tasks[task].tuned_on
    runs = {k: r for k, r in study.view(records, pedro_revision=revision, on=on).items()
            if r["task"] != source}
    runs.update({k: r for k, r in study.view(records, pedro_revision=tuned, on=on).items()
                 if r["task"] == source})
    return runs


def task_view(study, records: Dict[str, dict], task: str, on: Optional[str] = None):
    """(the runs the configurations of `task` are chosen from, the revision of PEDRO's code to
    report, the revision of the sweep that chose its configuration): of PEDRO's revisions, the
    one whose final runs on platform `on` (None: any) have the most seeds, the newest on a tie
    (so a rerun replaces the earlier revision's results once it has as many seeds). A task tuned
    on another may take its configuration from that task's sweep at another revision than its
    own runs'."""
    current = recipe_revision("pedro", {})
    if "pedro" not in study.sweeps:
        return study.view(records), current, current
    source = study.tasks[task].tuned_on
    choices = []
    for revision in range(1, current + 1):
        for tuned in (range(1, current + 1) if source else (revision,)):
            runs = _revision_view(study, records, task, revision, tuned)
            counted = runs if on is None else _revision_view(study, records, task, revision, tuned, on)
            n = _pedro_final_seeds(study, task, runs, counted)
            choices.append(((n, revision, tuned == revision, tuned), runs, revision, tuned))
    _, runs, revision, tuned = max(choices, key=lambda c: c[0])
    return runs, revision, tuned


def _variant_runs(study, task: str, runs: Dict[str, dict], best: Dict) -> List[dict]:
    """The runs of PEDRO's variants of its `best` configuration on `task` (not those of
    another configuration, e.g. one chosen by an earlier revision's sweep)."""
    order = list(study.variants)
    return sorted((r for r in runs.values() if r["task"] == task and r.get("variant") in study.variants
                   and r["config"] == {**best, **study.variants[r["variant"]]}),
                  key=lambda r: (order.index(r["variant"]), r["seed"]))


def _final_entry(seeds: Dict[int, dict], config: Dict) -> dict:
    f = {"config": config, "seeds": sorted(seeds),
         "trainable_params": next(iter(seeds.values()))["trainable_params"],
         "adapter": next(iter(seeds.values())).get("adapter"),
         "best_step": [seeds[s]["best_step"] for s in sorted(seeds)],
         "steps": [seeds[s]["steps"] for s in sorted(seeds)]}
    for key, _ in METRICS:
        vals = [seeds[s][key] for s in sorted(seeds) if key in seeds[s]]
        if vals:
            f[key] = _mean_std(vals)
    return f


def _compare(study, task: str, runs: Dict[str, dict], bests: Dict[str, Dict]) -> dict:
    """The final runs of each method's chosen configuration in `runs` (one platform's), PEDRO
    paired against each other method, PEDRO's variants paired against PEDRO, and the vectors'
    spread. The per-seed runs go under "_seeds" (dropped from quality.json)."""
    out = {"final": {}, "paired_vs_pedro": {}, "variants": {}, "_seeds": {}}
    for method, best in bests.items():
        seeds = {r["seed"]: r for r in runs.values()
                 if r["task"] == task and r["method"] == method and r["config"] == best}
        if seeds:
            out["_seeds"][method] = seeds
            out["final"][method] = _final_entry(seeds, best)
    finals = out["_seeds"]
    variant_runs: List[dict] = []
    if "pedro" in finals:
        for method, seeds in finals.items():
            if method != "pedro":
                out["paired_vs_pedro"][method] = {
                    key: p for key, sign in METRICS
                    if (p := paired(finals["pedro"], seeds, key, sign)) is not None}
    if "pedro" in bests:
        variant_runs = _variant_runs(study, task, runs, bests["pedro"])
    by_variant: Dict[str, Dict[int, dict]] = {}
    for r in variant_runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    for name, seeds in by_variant.items():
        v = {"config": seeds[min(seeds)]["config"], "seeds": sorted(seeds),
             "trainable_params": next(iter(seeds.values()))["trainable_params"],
             "best_step": [seeds[s]["best_step"] for s in sorted(seeds)]}
        for key, sign in METRICS:
            vals = [seeds[s][key] for s in sorted(seeds) if key in seeds[s]]
            if vals:
                v[key] = _mean_std(vals)
                # variant minus the PEDRO recipe it modifies: positive = the variant is better
                v[key + "_vs_pedro"] = paired(seeds, finals.get("pedro", {}), key, sign)
        v["best_dev_loss"] = _mean_std([seeds[s]["best_dev_loss"] for s in sorted(seeds)])
        out["variants"][name] = v
    out["vector_spread"] = _spread_summary(finals.get("pedro", {}), variant_runs)
    return out


def build_report(study, records: Dict[str, dict], machine: dict) -> dict:
    """records: every run of runs.jsonl (RunStore.load), of every revision and platform."""
    tasks = [t for t in study.tasks if any(r["task"] == t for r in records.values())]
    out = {"machine": machine, "settings": study.settings(), "tasks": {}}
    for task in tasks:
        # each platform at the revision of PEDRO's code with the most seeds there; the main
        # platform (the task's tables) is the one with the most final runs, native on a tie
        sections = {}
        for p in {platform(r) for r in records.values() if r["task"] == task}:
            chosen_from, revision, tuned = task_view(study, records, task, on=p)
            bests = {m: b for m in study.sweeps
                     if (b := study.best_config(task, m, chosen_from)) is not None}
            sec = _compare(study, task, _revision_view(study, records, task, revision, tuned, on=p),
                           bests)
            sections[p] = (sec, chosen_from, revision, tuned)
        main = max(sorted(sections), key=lambda p: (sum(map(len, sections[p][0]["_seeds"].values())),
                                                     p == NATIVE))
        home, runs, pedro_recipe, pedro_recipe_tuned = sections.pop(main)
        t = {"zero_shot": runs.get(run_id(task, "base", {}, 0)), "sweep": {},
             "tuned_on": study.tasks[task].tuned_on, "platform": main,
             "pedro_recipe": pedro_recipe, "pedro_recipe_tuned": pedro_recipe_tuned,
             "pedro_recipe_current": recipe_revision("pedro", {}), "other_platforms": {}}
        for method in study.sweeps:
            configs, complete = study.sweep_configs(task, method, runs)
            rows = []
            for c in configs:
                r = runs.get(run_id(task, method, c, 0))
                if r is not None:
                    rows.append({**{k: r.get(k) for k in (
                        "config", "best_dev_loss", "best_step", "steps", "test_loss",
                        "test_accuracy", "trainable_params", "s_per_step")}, "platform": platform(r)})
            if rows:
                t["sweep"][method] = {"complete": complete, "runs": rows,
                                      "best_config": study.best_config(task, method, runs)}
        for p, (sec, _, revision, _) in sorted(sections.items()):
            if not sec["final"] and not sec["variants"]:
                continue
            sec["pedro_recipe"] = revision
            sec["cpu"] = sorted({r.get("cpu") or "cpu not recorded" for r in records.values()
                                 if r["task"] == task and platform(r) == p})
            sec["effect_vs_main"] = {  # the same runs on this platform minus on the main one
                m: {key: q for key, sign in METRICS
                    if (q := paired(seeds, home["_seeds"].get(m, {}), key, sign)) is not None}
                for m, seeds in sec["_seeds"].items()
                if sec["final"][m]["config"] == home["final"].get(m, {}).get("config")
                and (m != "pedro" or revision == pedro_recipe)}
            sec.pop("_seeds")
            t["other_platforms"][p] = sec
        home.pop("_seeds")
        t.update(home)
        revisions = {main: (pedro_recipe, pedro_recipe_tuned),
                     **{p: (revision, tuned) for p, (_, _, revision, tuned) in sections.items()}}
        trained = [r for p, (revision, tuned) in revisions.items()
                   for r in _revision_view(study, records, task, revision, tuned, on=p).values()
                   if r["task"] == task and "best_step" in r]
        t["best_step_check"] = {  # every platform's runs
            "runs": len(trained),
            "best_is_last": sum(r["best_is_last"] for r in trained),
            # how much the dev loss still fell over the last evaluation interval (0 when the
            # best step came earlier): small = the run had levelled off
            "last_interval_gain": {m: statistics.median(_last_gain(r) for r in trained if r["method"] == m)
                                   for m in sorted({r["method"] for r in trained})},
            "by_method": {m: sorted({f"{r['best_step']}/{r['steps']}" for r in trained
                                     if r["method"] == m}) for m in sorted({r["method"] for r in trained})}}
        spent = [r for r in records.values() if r["task"] == task and "best_step" in r]
        t["compute"] = {  # every training run made for the task, superseded revisions included
            "runs": len(spent),
            "train_s": sum(r["train_s"] for r in spent),
            "median_s_per_step": statistics.median(r["s_per_step"] for r in spent) if spent else None}
        out["tasks"][task] = t
    return out


def _last_gain(r: dict) -> float:
    curve = [loss for _, loss in r["dev_curve"] if loss is not None]
    return max(0.0, curve[-2] - curve[-1]) if len(curve) >= 2 else float("nan")


def _spread_summary(pedro_seeds: Dict[int, dict], variant_runs: List[dict]) -> dict:
    """Per configuration (PEDRO's best, each variant): the vectors' spread across a dev batch's
    prompts and the RMS of their static part b_up, per layer and averaged over layers, at the
    best step, averaged over seeds."""
    groups = {"pedro": [r for r in pedro_seeds.values() if "vector_spread_best" in r]}
    for r in variant_runs:
        if "vector_spread_best" in r:
            groups.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in groups.items():
        if not rs:
            continue
        diags = [r["vector_spread_best"] for r in rs]
        layers = diags[0]["layers"]
        per_layer = {k: [statistics.mean(d[k][i] for d in diags) for i in range(len(layers))]
                     for k in ("spread_rms", "static_rms")}
        spread = statistics.mean(d["mean_spread_rms"] for d in diags)
        static = statistics.mean(d["mean_static_rms"] for d in diags)
        out[name] = {"seeds": len(rs), "layers": layers, **per_layer, "mean_spread_rms": spread,
                     "mean_static_rms": static, "ratio": spread / static if static else None}
    return out


def _fmt(ms: Optional[dict], digits=3) -> str:
    if not ms:
        return "-"
    std = f" ± {ms['std']:.{digits}f}" if ms.get("std") is not None else ""
    return f"{ms['mean']:.{digits}f}{std}"


def _fmt_paired(p: Optional[dict], flag: bool = True) -> str:
    if not p:
        return "-"
    se = f" ± {p['se']:.3f}" if p["se"] is not None else ""
    flag = " **" if flag and p["ahead_by_2se"] else ""
    return f"{p['mean']:+.3f}{se} (n={p['n']}){flag}"


def markdown(rep: dict) -> str:
    lines = []
    for task, t in rep["tasks"].items():
        lines += [f"## {task}", ""]
        z = t.get("zero_shot")
        if z:
            acc = f", accuracy {z['test_accuracy']:.3f}" if "test_accuracy" in z else ""
            lines += [f"Untrained base model ({_gemm(platform(z))}): response loss "
                      f"{z['test_loss']:.3f}{acc}.", ""]
        now = t["pedro_recipe_current"]
        if t["pedro_recipe"] != now:
            lines += [f"PEDRO's runs here are of recipe revision {t['pedro_recipe']} "
                      f"(bench/quality/methods.py, recipe_revision), earlier than the current "
                      f"{now}, and not rerun yet.", ""]
        if t.get("tuned_on") and t["pedro_recipe_tuned"] != t["pedro_recipe"]:
            lines += [f"PEDRO's configuration here was chosen by its sweep on {t['tuned_on']} at "
                      f"recipe revision {t['pedro_recipe_tuned']}, its runs are of revision "
                      f"{t['pedro_recipe']}.", ""]
        chosen = (f"its best configuration on {t['tuned_on']} (same data; chosen on the dev split "
                  f"there, no sweep of its own)" if t.get("tuned_on")
                  else "its best learning rate on the dev split")
        lines += _compare_md(t, f"Final, {_gemm(t['platform'])} (each method at {chosen}; "
                                f"mean ± std over seeds):")
        if t["sweep"]:
            lines += ["", "Sweep (seed 0; selection by best dev loss):", "",
                      "| method | config | best dev loss | best step / steps | test accuracy | test loss |",
                      "|---|---|---|---|---|---|"]
            for m, s in t["sweep"].items():
                for r in s["runs"]:
                    mark = " (best)" if r["config"] == s["best_config"] else ""
                    if r["platform"] != t["platform"]:
                        mark += f" [{r['platform']}]"
                    acc = f"{r['test_accuracy']:.3f}" if r.get("test_accuracy") is not None else "-"
                    lines.append(f"| {m} | {_cfg(r['config'])}{mark} | {r['best_dev_loss']:.4f} | "
                                 f"{r['best_step']}/{r['steps']} | {acc} | {r['test_loss']:.4f} |")
        c, b = t["compute"], t["best_step_check"]
        gains = ", ".join(f"{m} {g:.4f}" for m, g in b["last_interval_gain"].items())
        if c["median_s_per_step"] is not None:  # some training run has finished
            lines += ["", f"Best step = last step in {b['best_is_last']} of {b['runs']} training "
                      f"runs (every platform's); median dev-loss decrease over the last evaluation "
                      f"interval: {gains}. Compute: {c['runs']} runs, {c['train_s'] / 3600:.2f} h "
                      f"of training, median {c['median_s_per_step']:.2f} s per step.", ""]
        for p, sec in t["other_platforms"].items():
            lines += ([""] if lines[-1] else []) + [f"### {task}: the runs made {_gemm(p)} ({', '.join(sec['cpu'])})", "",
                      "Each pair below compares runs of this platform only."
                      + (f" PEDRO's runs here are of recipe revision {sec['pedro_recipe']}."
                         if sec["pedro_recipe"] != t["pedro_recipe"] else ""), ""]
            lines += _compare_md(sec, "Final runs of the chosen configurations here (mean ± std "
                                      "over seeds):")
            if sec["effect_vs_main"]:
                lines += ["", f"The platform's effect: a method's result here minus its result "
                              f"{_gemm(t['platform'])}, same configuration and seeds (accuracy: "
                              f"here − there, loss: there − here; positive = better here):", "",
                          "| method | accuracy | response loss |", "|---|---|---|"]
                for m, q in sec["effect_vs_main"].items():
                    lines.append(f"| {m} | {_fmt_paired(q.get('test_accuracy'), flag=False)} | "
                                 f"{_fmt_paired(q.get('test_loss'), flag=False)} |")
            lines.append("")
    m = rep["machine"]
    lines += [f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores shared with other jobs, "
              f"{m.get('threads')} torch thread(s) per process, torch {m.get('torch')}; "
              f"model: {rep['settings']['model']}.", ""]
    return "\n".join(lines)


def _gemm(p: str) -> str:
    return {"bf16 native": "with bf16 GEMMs in hardware", "bf16 emulated":
            "with bf16 GEMMs emulated around fp32 ones", "fp32": "in fp32"}.get(p, f"on {p}")


def _compare_md(t: dict, title: str) -> List[str]:
    """The final, paired, variant and spread tables of one platform's runs (_compare)."""
    if not t["final"]:
        lines = ["No final runs here yet: nothing to pair with."]
    else:
        lines = [title, "",
                 "| method | config | trainable params | test accuracy | test response loss | seeds | best step / steps |",
                 "|---|---|---|---|---|---|---|"]
    for m, f in t["final"].items():
        bs = ", ".join(f"{b}/{s}" for b, s in zip(f["best_step"], f["steps"]))
        lines.append(f"| {m} | {_cfg(f['config'])} | {f['trainable_params']:,d} | "
                     f"{_fmt(f.get('test_accuracy'))} | {_fmt(f.get('test_loss'))} | "
                     f"{len(f['seeds'])} | {bs} |")
    if t["paired_vs_pedro"]:
        lines += ["", "Paired difference, PEDRO ahead of each method (same seeds; mean ± standard "
                  "error; accuracy: PEDRO − other, loss: other − PEDRO; ** = ahead by more than 2 SE):", "",
                  "| other method | accuracy | response loss |", "|---|---|---|"]
        for m, p in t["paired_vs_pedro"].items():
            lines.append(f"| {m} | {_fmt_paired(p.get('test_accuracy'))} | "
                         f"{_fmt_paired(p.get('test_loss'))} |")
    if t["variants"]:
        pairing = ("paired against it, positive = the variant is better" if "pedro" in t["final"]
                   else "no PEDRO runs here to pair them with")
        lines += ["", f"PEDRO variants (one change to PEDRO's best configuration; {pairing}):", "",
                  "| variant | overrides | params | test accuracy | test response loss | best dev loss | vs PEDRO: accuracy | vs PEDRO: loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in t["variants"].items():
            lines.append(f"| {name} | {_cfg(v['config'])} | {v['trainable_params']:,d} | "
                         f"{_fmt(v.get('test_accuracy'))} | {_fmt(v.get('test_loss'))} | "
                         f"{_fmt(v.get('best_dev_loss'))} | "
                         f"{_fmt_paired(v.get('test_accuracy_vs_pedro'))} | "
                         f"{_fmt_paired(v.get('test_loss_vs_pedro'))} |")
    if t.get("vector_spread"):
        lines += ["", "Is the prompt-dependent part used? RMS of the vectors' spread across one dev "
                  "batch's prompts against the RMS of their static part b_up, mean over layers, "
                  "at the best step:", "",
                  "| configuration | seeds | spread across prompts | static part | spread / static | layer 0 spread / static |",
                  "|---|---|---|---|---|---|"]
        for name, d in t["vector_spread"].items():
            l0 = (f"{d['spread_rms'][0]:.2e} / {d['static_rms'][0]:.2e}")
            ratio = f"{d['ratio']:.3f}" if d["ratio"] is not None else "-"
            lines.append(f"| {name} | {d['seeds']} | {d['mean_spread_rms']:.2e} | "
                         f"{d['mean_static_rms']:.2e} | {ratio} | {l0} |")
    return lines


def _cfg(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"


def plot(rep: dict, path: str) -> None:
    """Paired differences (positive = PEDRO ahead; variants: positive = better than PEDRO),
    error bars ± 2 standard errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for task, t in rep["tasks"].items():
        for key, label in (("test_accuracy", "accuracy"), ("test_loss", "response loss")):
            rows = []
            sections = [(t["platform"], t), *t["other_platforms"].items()]
            for p, sec in sections:
                where = f"[{p}] " if len(sections) > 1 else ""
                rows += [(f"{where}PEDRO vs {m}", p[key]) for m, p in sec["paired_vs_pedro"].items()
                         if key in p]
                rows += [(f"{where}variant {n} vs PEDRO", v[key + "_vs_pedro"])
                         for n, v in sec["variants"].items() if v.get(key + "_vs_pedro")]
            if rows:
                panels.append((task, label, rows))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * max(len(p[2]) for p in panels) + 1.6),
                             squeeze=False)
    for ax, (task, label, rows) in zip(axes[0], panels):
        ys = range(len(rows))
        means = [p["mean"] for _, p in rows]
        errs = [2 * p["se"] if p["se"] is not None else 0 for _, p in rows]
        colors = ["C0" if "PEDRO vs" in n else "C1" for n, _ in rows]
        ax.barh(list(ys), means, xerr=errs, color=colors, capsize=3)
        for y, (_, p) in zip(ys, rows):
            ax.scatter(p["diffs"], [y] * len(p["diffs"]), color="k", s=8, zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(list(ys), [n for n, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{task}: {label}", fontsize=10)
        ax.set_xlabel("paired difference (positive = first named is better)", fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, CPU; bars: mean paired difference over seeds ± 2 SE, "
                 "dots: each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spread(rep: dict, path: str) -> None:
    """Per layer: the vectors' spread across prompts and their static part (log scale), for
    PEDRO's best configuration and the variant without the pooled-input norm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [(task, t["vector_spread"]) for task, t in rep["tasks"].items() if t.get("vector_spread")]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, (task, spread) in zip(axes[0], tasks):
        for name, color in (("pedro", "C0"), ("no-pool-norm", "C3")):
            d = spread.get(name)
            if not d:
                continue
            ax.semilogy(d["layers"], d["spread_rms"], "-o", ms=3, color=color,
                        label=f"{name}: spread across prompts")
            ax.semilogy(d["layers"], d["static_rms"], "--", color=color,
                        label=f"{name}: static part b_up")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("RMS")
        ax.set_title(f"{task}: PEDRO vectors at the best step", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(study, records: Dict[str, dict], machine: dict, out: str, **extra) -> dict:
    """records: every run of runs.jsonl (RunStore.load)."""
    rep = build_report(study, records, machine)
    rep["settings"].update(extra)
    rep["runs"] = sorted(records.values(), key=lambda r: r["run_id"])
    for name, text in (("quality.json", json.dumps(rep, indent=1)), ("quality.md", markdown(rep))):
        tmp = os.path.join(out, f"{name}.{os.getpid()}.tmp")  # (workers may write at once)
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out, name))
    plot(rep, os.path.join(out, "quality.png"))
    plot_spread(rep, os.path.join(out, "quality_spread.png"))
    return rep
