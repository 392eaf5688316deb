"""python -m bench.quality [--quick] [--out bench/results/quality]

PEDRO vs LoRA vs IA3 on SmolLM2-135M-Instruct (real weights, CPU), same step budget, 3 seeds:
  bbc-64 / bbc-256: BBC News topic classification with 64 / 256 training articles; metric:
      test accuracy, the label word whose first token scores highest after the prompt.
  chat: chatterbot English Q/A pairs, 256 training pairs; metric: held-out response loss (and
      perplexity).
Every method: AdamW, warm-up + linear decay, the same steps and batch size, evaluation on the dev
split every K steps, best dev weights kept. PEDRO's bi-level rational step uses the dev split as
its held-out split (as the PEDRO/IAPT family does).
"""
import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch

from pedro_ext import PedroConfig, PedroModel, get_pedro_model
from pedro_ext.offline import load_smollm2
from pedro_ext.train import TrainConfig, encode, evaluate, train, train_baseline

from .data import BBC_LABELS, bbc_splits, chat_splits

METHODS = {
    # name: (how to build, learning rate)
    "pedro": dict(lr=2e-3, r=4),
    "lora": dict(lr=2e-3, r=8),
    "ia3": dict(lr=1e-2),
}


def build(method, model):
    import peft
    if method == "pedro":
        return get_pedro_model(model, PedroConfig(r=METHODS["pedro"]["r"]))
    if method == "lora":
        cfg = peft.LoraConfig(r=METHODS["lora"]["r"], lora_alpha=2 * METHODS["lora"]["r"],
                              lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return peft.get_peft_model(model, cfg)
    if method == "ia3":
        return peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM"))
    raise ValueError(method)


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def accuracy(model, tok, pairs, batch_size=10) -> float:
    """First-token scoring of the 5 label words after each prompt (left-padded batches)."""
    label_ids = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in BBC_LABELS.values()]
    assert len(set(label_ids)) == len(label_ids), "label words must differ in their first token"
    words = list(BBC_LABELS.values())
    model.eval()
    correct = 0
    tok.padding_side = "left"
    is_pedro = isinstance(model, PedroModel)
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        logits = model(**enc).logits[:, -1] if not is_pedro else model(**enc).logits[:, -1]
        pred = logits[:, label_ids].argmax(-1)
        correct += sum(words[int(k)] == r.strip() for k, (_, r) in zip(pred, chunk))
    return correct / len(pairs)


def run_one(task, method, seed, splits, args, tok):
    model, _ = load_smollm2()
    torch.manual_seed(seed)
    net = build(method, model)
    params = trainable_params(net)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=METHODS[method]["lr"],
                      rational_lr=args.rational_lr, rational_mode="bilevel",
                      bilevel_every=args.bilevel_every,
                      eval_every=args.eval_every, max_length=args.max_length, seed=seed,
                      progress=False)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if method == "pedro":
            summary = train(net, tok, splits["train"], splits["dev"],
                            TrainConfig(**{**cfg.__dict__, "output_dir": tmp}))
        else:
            summary = train_baseline(net, tok, splits["train"], splits["dev"], cfg)
    result = dict(task=task, method=method, seed=seed, trainable_params=params,
                  best_dev_loss=summary["best_dev_loss"], best_step=summary["best_step"],
                  train_s=time.time() - t0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if task.startswith("bbc"):
        result["test_accuracy"] = accuracy(net, tok, splits["test"])
    test_ex = [encode(tok, p, r, args.max_length) for p, r in splits["test"]]
    result["test_loss"] = evaluate(net, test_ex, pad)
    result["test_ppl"] = math.exp(result["test_loss"])
    return result


def zero_shot(task, splits, args, tok):
    model, _ = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    r = dict(task=task, method="base (no training)", seed=0, trainable_params=0)
    if task.startswith("bbc"):
        r["test_accuracy"] = accuracy(model, tok, splits["test"])
    r["test_loss"] = evaluate(model, [encode(tok, p, q, args.max_length) for p, q in splits["test"]], pad)
    r["test_ppl"] = math.exp(r["test_loss"])
    return r


def summarize(results):
    groups = {}
    for r in results:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    rows = []
    for (task, method), rs in sorted(groups.items()):
        row = dict(task=task, method=method, seeds=len(rs), trainable_params=rs[0]["trainable_params"])
        for key in ("test_accuracy", "test_loss", "test_ppl"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key + "_mean"] = statistics.mean(vals)
                row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[key + "_all"] = vals
        rows.append(row)
    return rows


def table(rows):
    lines = ["| task | method | trainable params | test accuracy (mean ± std) | test response loss (mean ± std) | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}"
               if "test_accuracy_mean" in r else "-")
        loss = f"{r['test_loss_mean']:.3f} ± {r['test_loss_std']:.3f}"
        lines.append(f"| {r['task']} | {r['method']} | {r['trainable_params']:,d} | {acc} | {loss} | {r['seeds']} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4))
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        rs = [r for r in rows if r["task"] == task]
        key = "test_accuracy" if task.startswith("bbc") else "test_loss"
        names = [r["method"] for r in rs]
        means = [r[key + "_mean"] for r in rs]
        stds = [r[key + "_std"] for r in rs]
        ax.bar(range(len(rs)), means, yerr=stds, capsize=4, color="C0")
        for i, r in enumerate(rs):
            ax.scatter([i] * len(r[key + "_all"]), r[key + "_all"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(rs)), names, rotation=20)
        ax.set_title(task)
        ax.set_ylabel("test accuracy" if key == "test_accuracy" else "test response loss (lower is better)")
    fig.suptitle("SmolLM2-135M-Instruct, CPU; bars: mean over seeds, dots: each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, bbc-64 only, few steps")
    ap.add_argument("--out", default="bench/results/quality")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-words", type=int, default=48, help="article words kept in a prompt")
    ap.add_argument("--rational-lr", type=float, default=1e-4)
    ap.add_argument("--bilevel-every", type=int, default=4,
                    help="PEDRO: one held-out rational step per this many training steps")
    ap.add_argument("--tasks", default="bbc-64,bbc-256,chat")
    ap.add_argument("--methods", default="pedro,lora,ia3")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.tasks = 1, 4, 2, "bbc-64"
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    _, tok = load_smollm2()
    tasks = {}
    for task in args.tasks.split(","):
        if task.startswith("bbc-"):
            tasks[task] = bbc_splits(int(task.split("-")[1]), 10, 20, args.max_words, seed=0)
        elif task == "chat":
            tasks[task] = chat_splits(256, 50, 150, seed=0)
        else:
            raise SystemExit(f"unknown task {task}")
    results = []
    log = open(os.path.join(args.out, "runs.jsonl"), "w")
    for task, splits in tasks.items():
        results.append(zero_shot(task, splits, args, tok))
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                r = run_one(task, method, seed, splits, args, tok)
                results.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(json.dumps(r), flush=True)
    rows = summarize(results)
    out = dict(machine=dict(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                            torch=torch.__version__, threads=torch.get_num_threads()),
               settings=dict(vars(args), methods_config=METHODS), wall_s=time.time() - t0,
               summary=rows, runs=results)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text + f"\n\nwall time {out['wall_s'] / 60:.1f} min on {os.cpu_count()} CPU cores\n")
    plot(rows, os.path.join(args.out, "quality.png"))
    print(text)
    print(f"wall time {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
