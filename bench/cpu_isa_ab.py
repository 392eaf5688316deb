"""Two builds of pedro_ext's CPU kernels timed against each other on the ops of a decoding step.

    python -m bench.cpu_isa_ab --tree old=/path/to/old/checkout --tree new=. --rounds 8 \\
        --out bench/results/cpu-2core/isa-ab

Each tree is a source checkout with its extension built in place (two builds of the same ops
cannot share a process, since both register torch.ops.pedro_ext). Every round runs one worker
process per tree, in ABBA order over rounds so that drift falls on both alike; a worker times
the per-token ops at SmolLM2-135M's decode shapes (Q 576, V 192, FFN-up 1536 wide; one token
per request), with torch's own eager ops on the same tensors as a yardstick, and prints per-call
medians. Each call takes the next of enough input sets to fill 128 MiB (four times this VM's
32 MiB L3) so that, as in a decoding step whose weights evict them, its inputs come from memory.
Reported: each figure's median over rounds with its range, and the trees' ratio per round with
the number of rounds in which the first tree was the slower. A time shorter than moving the
call's bytes at twice the worker's best copy bandwidth is impossible: it is refused (left out,
and listed with its reason).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WIDTHS = {"q (modulate_)": 576, "v (modulate_)": 192, "up (act_mul_modulate)": 1536}
BATCHES = (1, 8, 32)
INPUT_BYTES = 128 * 2 ** 20


def _time_calls(fn, sets, calls=256, repeats=9):
    """Median over repeats of the mean time per call (us), each call on the next input set."""
    per_call, i = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*sets[i % len(sets)])
            i += 1
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call)


def worker() -> dict:
    import torch
    import torch.nn.functional as F

    import pedro_ext  # (registers the ops)
    from pedro_ext.bench.sanity import READ_OVER_COPY
    from pedro_ext.bench.timing import copy_bandwidth_gbs
    torch.set_num_threads(1)
    ops = torch.ops.pedro_ext
    copy_gbs = copy_bandwidth_gbs(INPUT_BYTES // 4, torch.float32, torch.device("cpu"), warmup=2,
                                  repeats=5, best=True)
    out = {"cpu_kernel_isa": pedro_ext.build_info().get("cpu_kernel_isa", "not reported"),
           "pedro_ext_file": os.path.realpath(pedro_ext._C.__file__), "copy_gbs": copy_gbs,
           "figures": {}, "refused": {}}
    gen = torch.Generator().manual_seed(0)
    for name, width in WIDTHS.items():
        for b in BATCHES:
            fused = name.startswith("up")
            shape = (b, 1, width)
            n_sets = -(-INPUT_BYTES // ((3 if fused else 2) * b * width * 4))
            # vectors of ones keep the in-place products from drifting into denormals
            if fused:
                sets = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                         torch.ones(b, width)) for _ in range(n_sets)]
                ours = lambda g, u, v: ops.act_mul_modulate(g, u, v, None, "silu", False)
                torch_ops = lambda g, u, v: F.silu(g) * u * v.unsqueeze(1)
            else:
                sets = [(torch.randn(shape, generator=gen), torch.ones(b, width))
                        for _ in range(n_sets)]
                ours = lambda y, v: ops.modulate_(y, v, None, False)
                torch_ops = lambda y, v: y.mul_(v.unsqueeze(1))
            # bytes a call reads and writes: y and v, or gate, up, v and the output
            floor_us = (4 if fused else 3) * b * width * 4 / (READ_OVER_COPY * copy_gbs * 1e3)
            key = f"{name} B={b}"
            out["figures"][key] = {}
            for field, fn in (("pedro_ext_us", ours), ("torch_us", torch_ops)):
                _time_calls(fn, sets, repeats=1)  # warm-up
                us = _time_calls(fn, sets)
                if us < floor_us:
                    out["refused"][f"{key} {field}"] = (
                        f"{us:.3g} us is faster than moving its bytes ({floor_us:.3g} us at "
                        f"{READ_OVER_COPY:g}x the best copy bandwidth, {copy_gbs:.1f} GB/s)")
                    us = None
                out["figures"][key][field] = us
            del sets
    return out


def run_worker(tree: str) -> dict:
    tree = os.path.realpath(tree)
    path = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    # this file runs the worker, so the other tree needs no copy of it
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                          cwd=tree, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"worker for tree {tree} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["pedro_ext_file"].startswith(tree + os.sep):
        raise SystemExit(f"the worker for tree {tree} imported {out['pedro_ext_file']}, another "
                         f"build: is the extension built in place there?")
    return out


def commit_of(tree: str) -> str:
    proc = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no",
                            "--", "csrc", "setup.py"],  # what the build is made of
                           capture_output=True, text=True, check=False).stdout.strip()
    suffix = " (csrc with uncommitted changes)" if dirty else ""
    return (proc.stdout.strip() or "unknown") + suffix


def _stats(vals) -> dict:
    """Median and range of the figures that were not refused (None: all were)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def summarise(names, rounds) -> dict:
    figures = rounds[0][names[0]]["figures"]
    table = {}
    for key in figures:
        row = {}
        for n in names:
            for field in ("pedro_ext_us", "torch_us"):
                row[f"{n} {field}"] = _stats([r[n]["figures"][key][field] for r in rounds])
        a, b = names
        times = [(r[a]["figures"][key]["pedro_ext_us"], r[b]["figures"][key]["pedro_ext_us"])
                 for r in rounds]
        ratios = [ta / tb for ta, tb in times if ta is not None and tb is not None]
        row[f"{a} / {b} time"] = dict(_stats(ratios), rounds=len(ratios),
                                      rounds_slower=sum(r > 1 for r in ratios))
        table[key] = row
    return table


def refusals(names, rounds) -> list:
    return [f"round {i + 1}, {n}: {what}: {why}" for i, r in enumerate(rounds) for n in names
            for what, why in r[n].get("refused", {}).items()]


def markdown(result: dict) -> str:
    a, b = result["trees"]
    lines = [f"Per-call time (us) of the per-token ops at SmolLM2-135M decode shapes, median over "
             f"{result['rounds']} rounds (range); machine: {result['machine']}; {a}: CPU loops "
             f"{result['isa'][a]} (commit {result['commits'][a]}), {b}: CPU loops "
             f"{result['isa'][b]} (commit {result['commits'][b]}); torch's eager ops on the same "
             f"tensors in each tree's process as a yardstick.", "",
             f"| op, batch | {a} | {b} | {a} / {b} time | rounds {a} slower | torch eager ({a} / "
             f"{b} process) |", "|---|---|---|---|---|---|"]
    fmt = lambda d: ("REFUSED" if d["median"] is None
                     else f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})")
    med = lambda d: "REFUSED" if d["median"] is None else f"{d['median']:.2f}"
    for key, row in result["table"].items():
        ratio = row[f"{a} / {b} time"]
        lines.append(f"| {key} | {fmt(row[f'{a} pedro_ext_us'])} | {fmt(row[f'{b} pedro_ext_us'])}"
                     f" | {fmt(ratio)} | {ratio['rounds_slower']} of {ratio['rounds']} | "
                     f"{med(row[f'{a} torch_us'])} / {med(row[f'{b} torch_us'])} |")
    refused = result.get("refused") or []
    if refused:
        lines += ["", "Refused figures (left out above):", ""] + [f"- {r}" for r in refused]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_isa_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout with its extension built in place; exactly two")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None, help="write DIR/ab.json and DIR/ab.md")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return
    trees = dict(t.split("=", 1) for t in args.tree if "=" in t)
    if len(trees) != 2 or len(args.tree) != 2 or any(not os.path.isdir(p) for p in trees.values()):
        raise SystemExit(f"--tree NAME=PATH must be given twice, with two names and existing "
                         f"checkouts, got {args.tree}")
    names = list(trees)
    rounds = []
    for i in range(args.rounds):
        order = names if i % 4 in (0, 3) else names[::-1]  # ABBA BAAB ...
        rounds.append({n: run_worker(trees[n]) for n in order})
        print(f"round {i + 1}/{args.rounds} done", flush=True)
    from pedro_ext.bench.runner import cpu_name
    load = os.getloadavg()[0]
    result = {"trees": names, "paths": trees, "rounds": args.rounds,
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, 1 torch thread, load average "
                         f"{load:.1f} at the end",
              "isa": {n: rounds[0][n]["cpu_kernel_isa"] for n in names},
              "commits": {n: commit_of(trees[n]) for n in names},
              "table": summarise(names, rounds), "refused": refusals(names, rounds),
              "per_round": rounds}
    text = markdown(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ab.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "ab.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
