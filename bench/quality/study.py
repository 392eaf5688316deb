"""The study's plan (sweep -> final seeds -> PEDRO variants) and the execution of one run.

Phases, each resumable (finished runs are read from runs.jsonl and skipped):
  sweep:    every method at seed 0 over its learning-rate grid; when the best value sits at an
            edge of the grid the grid is extended one step outward (up to `max_extend` times).
            Also the untrained base model once per task.
  final:    each method's best sweep configuration (lowest best dev loss) at seeds 0..n-1
            (seed 0 is the sweep's run); a task with `tuned_on` takes that task's best.
  variants: PEDRO's best configuration with one group of overrides at a time, at the given seeds.

Runs made under an earlier revision of a method's training code (methods.recipe_revision) stay in
runs.jsonl under their own ids, but the phases read only the current revision's: they are rerun.

Platforms (store.platform: the arithmetic of the base model's GEMMs): the choices are made once,
from the sweep's runs on whichever platform made them first, so replicating runs elsewhere never
changes a choice. The runs that are paired (final seeds, variants, and PEDRO's best configuration
at the variants' seeds, which they are paired against) belong to a platform: on a machine whose
platform differs from the finished runs', the final and variants phases make them again there.
"""
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from pedro_ext.train import TrainConfig, train

from .methods import METHODS, build, recipe_revision, split_config, trainable_params
from .store import Claims, RunStore, config_key, platform, record_key, run_id
from .tasks import TaskSpec, dataset_of, load_splits, score_test_split

# learning rates are swept on this ladder (half-decades), so an extension is one rung outward
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class Sweep:
    key: str  # the swept config key
    values: Tuple[float, ...]  # rungs of LR_LADDER
    fixed: Dict = field(default_factory=dict)  # the method's other settings
    # config key -> (method, key): taken from that method's best sweep configuration on the
    # same task (e.g. PEDRO's static_lr from the pedro-static control's best lr)
    inherit: Dict[str, Tuple[str, str]] = field(default_factory=dict)


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class Study:
    """load_model() -> (fresh base model, tokenizer); every run starts from a fresh model."""

    def __init__(self, out: str, tasks: Dict[str, TaskSpec], sweeps: Dict[str, Sweep],
                 variants: Dict[str, Dict], load_model: Callable, model_name: str,
                 splits_loader: Callable = load_splits, max_extend: int = 2,
                 log: Callable = print, run_info: Optional[Dict] = None):
        unknown = set(sweeps) - set(METHODS)
        if unknown:
            raise ValueError(f"sweeps for unknown methods {sorted(unknown)}")
        for m, s in sweeps.items():
            bad = [v for v in s.values if v not in LR_LADDER]
            if bad:
                raise ValueError(f"{m}: sweep values {bad} are not on LR_LADDER {LR_LADDER}")
        for name, spec in tasks.items():
            source = tasks.get(spec.tuned_on) if spec.tuned_on else spec
            if source is None or source.tuned_on or dataset_of(source) != dataset_of(spec) \
                    or source.splits != spec.splits:
                raise ValueError(f"task {name}: tuned_on={spec.tuned_on!r} must name a task of "
                                 f"this study with its own sweep, on the same data and splits")
        self.out, self.tasks, self.sweeps, self.variants = out, tasks, sweeps, variants
        self.load_model, self.model_name = load_model, model_name
        self.splits_loader, self.max_extend, self.log = splits_loader, max_extend, log
        self.run_info = dict(run_info or {})  # recorded with every run (machine, GEMM mode)
        self.platform = platform(self.run_info)
        self.fingerprints = {name: self._fingerprint(spec) for name, spec in tasks.items()}
        self.store = RunStore(os.path.join(out, "runs.jsonl"), self.fingerprints)
        self.claims = Claims(os.path.join(out, "claims"))
        self._splits: Dict[str, dict] = {}

    # ------------------------------------------------------------------ identity
    def _fingerprint(self, spec: TaskSpec) -> str:
        blob = json.dumps({"model": self.model_name, "task": spec.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def settings(self) -> dict:
        return {"model": self.model_name,
                "tasks": {n: {**s.to_dict(), "fingerprint": self.fingerprints[n]}
                          for n, s in self.tasks.items()},
                "sweeps": {m: {"key": s.key, "values": list(s.values), "fixed": s.fixed,
                               "inherit": s.inherit} for m, s in self.sweeps.items()},
                "lr_ladder": list(LR_LADDER), "max_extend": self.max_extend,
                "variants": self.variants}

    def splits(self, task: str, tokenizer) -> dict:
        if task not in self._splits:
            self._splits[task] = self.splits_loader(self.tasks[task], tokenizer)
        return self._splits[task]

    # ------------------------------------------------------------------ selection
    def view(self, records: Dict[str, dict], pedro_revision: Optional[int] = None,
             on: Optional[str] = None) -> Dict[str, dict]:
        """The runs the phases and the report read: {revision-free run id: record} for the
        records made under the current revision of their method's code (pedro_revision: PEDRO's
        runs at that revision instead, for a report of results not yet rerun). on: the runs of
        that platform only; None: each run's first record in runs.jsonl, whatever its platform
        (what the choices are made from)."""
        out = {}
        for rec in records.values():
            if on is not None and platform(rec) != on:
                continue
            want = recipe_revision(rec["method"], rec["config"])
            if pedro_revision is not None and rec["method"] == "pedro" and want > 1:
                want = pedro_revision
            if rec.get("recipe", 1) == want:
                out.setdefault(run_id(rec["task"], rec["method"], rec["config"], rec["seed"]), rec)
        return out

    def runs(self, on: Optional[str] = None) -> Dict[str, dict]:
        """The current revision's finished runs (see view)."""
        return self.view(self.store.load(), on=on)

    def fixed_config(self, task: str, method: str, runs: Dict[str, dict]) -> Optional[Dict]:
        """The method's fixed settings on `task`, inherited values resolved (None while the
        sweep they come from is not complete)."""
        s = self.sweeps[method]
        fixed = dict(s.fixed)
        for key, (source, source_key) in s.inherit.items():
            best = self.best_config(task, source, runs)
            if best is None:
                return None
            fixed[key] = best[source_key]
        return fixed

    def sweep_configs(self, task: str, method: str, runs: Dict[str, dict]) -> Tuple[List[Dict], bool]:
        """(configurations the sweep needs so far, whether it is complete). Extends the grid
        one rung past an edge while the best finished value sits on that edge. A task tuned on
        another has no sweep of its own: ([], True)."""
        if self.tasks[task].tuned_on:
            return [], True
        s = self.sweeps[method]
        fixed = self.fixed_config(task, method, runs)
        if fixed is None:
            return [], False

        def config(v):
            return {**fixed, s.key: v}
        values = list(s.values)
        for _ in range(self.max_extend + 1):
            results = {v: runs.get(run_id(task, method, config(v), 0)) for v in values}
            if any(r is None for r in results.values()):
                return [config(v) for v in values], False
            best = min(values, key=lambda v: results[v]["best_dev_loss"])
            lo, hi = min(values), max(values)
            i = LR_LADDER.index(best)
            if len(values) - len(s.values) >= self.max_extend:
                break
            if best == lo and i > 0:
                values.append(LR_LADDER[i - 1])
            elif best == hi and i + 1 < len(LR_LADDER):
                values.append(LR_LADDER[i + 1])
            else:
                break
        return [config(v) for v in sorted(values)], True

    def best_config(self, task: str, method: str, runs: Dict[str, dict]) -> Optional[Dict]:
        task = self.tasks[task].tuned_on or task
        configs, complete = self.sweep_configs(task, method, runs)
        if not complete:
            return None
        return min(configs, key=lambda c: runs[run_id(task, method, c, 0)]["best_dev_loss"])

    # ------------------------------------------------------------------ phases
    def run_phase(self, phase: str, tasks: List[str], methods: List[str], seeds: int,
                  variant_seeds: int, wait_s: float = 60.0) -> None:
        self.run_phases([phase], tasks, methods, seeds, variant_seeds, wait_s)

    def run_phases(self, phases: List[str], tasks: List[str], methods: List[str], seeds: int,
                   variant_seeds: int, wait_s: float = 60.0) -> None:
        """Run every missing run of `phases`. A job (phase, task, method) that waits on runs
        held by another worker, or on a sweep it depends on, is retried after the others, so a
        worker moves on to whatever it can run; when every remaining job waits and no other
        worker holds a claim, that is an error."""
        jobs = []
        for phase in phases:
            if phase not in ("sweep", "final", "variants"):
                raise ValueError(f"unknown phase {phase!r}")
            ms = ["pedro"] if phase == "variants" else \
                sorted(methods, key=lambda m: bool(self.sweeps[m].inherit))  # inheritors last
            if phase == "variants" and "pedro" not in methods:
                continue
            jobs += [(phase, t, "base") for t in tasks] if phase == "sweep" else []
            jobs += [(phase, t, m) for t in tasks for m in ms]
        unattended = 0  # consecutive passes where everything waited and no worker held a claim
        while jobs:
            states = {job: self._advance(*job, seeds, variant_seeds) for job in jobs}
            jobs = [job for job, state in states.items() if state != "done"]
            if not jobs or any(states[job] == "progress" for job in jobs):
                unattended = 0
                continue
            if self.claims.active():
                unattended = 0
                self.log(f"wait {wait_s:.0f} s: {jobs} need runs other workers hold")
                time.sleep(wait_s)
                continue
            unattended += 1
            if unattended >= 2:
                raise RuntimeError(f"{jobs} wait on sweeps nobody is running (run the sweep "
                                   "phase for them first)")

    def _wanted(self, phase, task, method, seeds, variant_seeds) -> Optional[List[tuple]]:
        """(config, seed, variant) runs the job needs now; None while it waits on a sweep."""
        runs = self.runs()
        if method == "base":
            return [({}, 0, None)]
        if phase == "sweep":
            if self.fixed_config(task, method, runs) is None:
                return None
            return [(c, 0, None) for c in self.sweep_configs(task, method, runs)[0]]
        best = self.best_config(task, method, runs)
        if best is None:
            return None
        if phase == "final":
            return [(best, seed, None) for seed in range(seeds)]
        wanted = [(best, seed, None) for seed in range(variant_seeds)]  # what they are paired with
        for name, overrides in self.variants.items():
            config = {**best, **overrides}
            if config != best:  # (a variant equal to the best configuration is the base itself)
                wanted += [(config, seed, name) for seed in range(variant_seeds)]
        return wanted

    def _advance(self, phase, task, method, seeds, variant_seeds) -> str:
        """Run what the job needs: "done" when it needs nothing more, "wait" when what is left
        is held by other workers or waits on another sweep, else "progress"."""
        wanted = self._wanted(phase, task, method, seeds, variant_seeds)
        if wanted is None:
            return "wait"
        runs = self.runs() if phase == "sweep" else self.runs(on=self.platform)
        missing = [(c, s, v) for c, s, v in wanted if run_id(task, method, c, s) not in runs]
        if not missing:
            return "done"
        ran = False
        for config, seed, variant in missing:
            ran |= self._ensure(task, method, config, seed, phase, variant)
        return "progress" if ran else "wait"

    def _ensure(self, task, method, config, seed, phase, variant=None) -> bool:
        """Run one run unless it is finished or another worker holds it; True if it ran."""
        revision = recipe_revision(method, config)
        rid = run_id(task, method, config, seed, revision)
        key = record_key(rid, self.platform)
        holder = self.claims.acquire(key)
        if holder is not None:
            return False
        try:  # finished since we looked (a sweep's run on any platform)
            if key in self.store.load() or (
                    phase == "sweep" and run_id(task, method, config, seed) in self.runs()):
                return False
            self.log(f"run  {rid} [{phase}, {self.platform}] load {_loadavg()}")
            record = self.execute(task, method, config, seed)
            record.update(run_id=rid, recipe=revision, phase=phase, variant=variant)
            self.store.append(record)
        finally:
            self.claims.release(key)
        self.log(f"done {rid}: " + json.dumps({k: record[k] for k in (
            "best_dev_loss", "best_step", "steps", "test_loss", "test_accuracy", "s_per_step")
            if k in record}))
        return True

    # ------------------------------------------------------------------ one run
    def execute(self, task: str, method: str, config: Dict, seed: int) -> dict:
        spec = self.tasks[task]
        t_start, load_start = time.time(), _loadavg()
        model, tok = self.load_model()
        splits = self.splits(task, tok)
        record = dict(task=task, method=method, config=config, config_key=config_key(config),
                      seed=seed, fingerprint=self.fingerprints[task],
                      split_sizes={k: len(v) for k, v in splits.items()}, **self.run_info)
        if method == "base":
            record.update(score_test_split(model, tok, splits["test"], spec))
            record.update(trainable_params=0, eval_s=time.time() - t_start,
                          loadavg=[load_start, _loadavg()])
            return record
        adapter_cfg, train_cfg = split_config(method, config)
        torch.manual_seed(seed)
        net, fit, hyper = build(method, model, adapter_cfg)
        tc = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, eval_every=spec.eval_every,
                         max_length=spec.max_length, seed=seed, progress=False, **train_cfg)
        with tempfile.TemporaryDirectory() as tmp:
            if fit is train:
                tc.output_dir = tmp
            summary = fit(net, tok, splits["train"], splits["dev"], tc)
        train_s = time.time() - t_start
        t_eval = time.time()
        metrics = score_test_split(net, tok, splits["test"], spec)
        history = summary["history"]
        record.update(
            trainable_params=trainable_params(net), adapter=hyper,
            train_config={k: v for k, v in tc.__dict__.items() if k not in ("output_dir", "progress")},
            best_dev_loss=summary["best_dev_loss"], best_step=summary["best_step"],
            steps=summary["steps"], best_is_last=summary["best_step"] == summary["steps"],
            dev_curve=[[h["step"], h["dev_loss"]] for h in history if "dev_loss" in h],
            train_loss=[round(h["train_loss"], 5) for h in history],
            train_s=train_s, s_per_step=summary["wall_s"] / max(1, summary["steps"]),
            eval_s=time.time() - t_eval, loadavg=[load_start, _loadavg()], **metrics)
        spread = [h for h in history if h.get("vector_spread")]
        if spread:  # PEDRO: is the generator using the prompt? (per-layer spread vs b_up)
            record["vector_spread_curve"] = [
                [h["step"], h["vector_spread"]["mean_spread_rms"], h["vector_spread"]["mean_static_rms"]]
                for h in spread]
            at_best = [h["vector_spread"] for h in spread if h["step"] == summary["best_step"]]
            if at_best:
                record["vector_spread_best"] = {k: at_best[0][k] for k in (
                    "layers", "spread_rms", "static_rms", "mean_spread_rms", "mean_static_rms")}
        if not math.isfinite(record["test_loss"]):
            raise RuntimeError(f"{task}/{method}/{config} seed {seed}: test loss is "
                               f"{record['test_loss']}")
        return record
