"""How PEDRO's scaling should enter a compiled decode step, measured: traced aten products (the
library's way under torch.compile, which inductor fuses into the neighbouring kernels) against
the pedro_ext custom ops in the graph (pedro_ext.layer.custom_ops_when_compiled), both beside the
bare model, interleaved in the same rounds (pedro_ext.bench.model_bench's protocol: HF generate
with a static cache, the decode step compiled by inductor, every step timed).

    python -m bench.compiled_scaling_ab [--preset cpu] [--batches 1 8] [--rounds 6] [--out DIR]

Writes DIR/scaling_ab.json (the bench rows plus, per batch size, the per-round ratio of the two
PEDRO variants' median step times) and prints a table."""
import argparse
import json
import os
import statistics
import time

import torch

from pedro_ext.bench.model_bench import ModelBench
from pedro_ext.bench.presets import PRESETS
from pedro_ext.bench.runner import machine_info
from pedro_ext.layer import custom_ops_when_compiled

CONTROL = "pedro_custom_ops"


class ScalingAB(ModelBench):
    """ModelBench with one more method: PEDRO whose compiled graph calls the custom ops."""

    def __init__(self, preset, device):
        super().__init__(preset, device, mode="compiled", methods=("base", "pedro"))
        self.methods.append(CONTROL)
        self.step_rounds = {}  # batch -> method -> per timed round [ttft, steps...]

    def _setup(self, method):
        if method != CONTROL:
            return super()._setup(method)
        generate = super()._setup("pedro")

        def run(batch, **kw):
            with custom_ops_when_compiled():
                return generate(batch, **kw)
        return run

    def _summarise(self, batch, runs, errors, graphs, profiles):
        self.step_rounds[batch] = runs
        return super()._summarise(batch, runs, errors, graphs, profiles)


def paired(runs: dict, rows: list) -> dict:
    """Per round: median step of the custom-op graph / median step of the traced one; nothing
    when either side's decode figure was refused by the sanity checks."""
    refused = {r["method"] for r in rows if r["phase"] == "decode" and r.get("median_ms") is None}
    if refused & {CONTROL, "pedro"}:
        return {}
    ratios = [statistics.median(ops[1:]) / statistics.median(traced[1:])
              for ops, traced in zip(runs.get(CONTROL, []), runs.get("pedro", []))]
    if not ratios:
        return {}
    return dict(median=statistics.median(ratios), minimum=min(ratios), maximum=max(ratios),
                n=len(ratios), rounds=ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write DIR/scaling_ab.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.batches) < 1 or args.rounds < 1:
        ap.error("--batches and --rounds must be positive")
    t0 = time.time()
    device = torch.device("cpu")
    preset = PRESETS[args.preset].replace(model_batches=tuple(args.batches),
                                          model_rounds=args.rounds)
    ab = ScalingAB(preset, device)
    rows = ab.rows()
    result = dict(machine=machine_info(device), preset=preset.__dict__, rows=rows,
                  paired={b: paired(r, [x for x in rows if x["batch_size"] == b])
                          for b, r in ab.step_rounds.items()},
                  messages=ab.messages, wall_s=time.time() - t0)
    m = result["machine"]
    print(f"{m.get('device_name')} ({m['cpu_count']} CPUs, torch {m['torch']}, "
          f"{torch.get_num_threads()} threads); {preset.name} preset, decode step compiled; "
          f"{args.rounds} interleaved rounds")
    print("| batch | method | TPOT ms (median) | IQR | vs base | vs base, rounds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["phase"] != "decode" or r.get("median_ms") is None:
            continue
        st = r.get("vs_base_rounds") or {}
        print(f"| {r['batch_size']} | {r['method']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
              f"{r.get('tokens_per_s_vs_base', 1.0):.3f} | "
              f"{st.get('minimum', 1.0):.3f}-{st.get('maximum', 1.0):.3f} |")
    for b, p in result["paired"].items():
        if p:
            print(f"B={b}: custom ops / traced products, per round: median {p['median']:.3f}, "
                  f"range {p['minimum']:.3f}-{p['maximum']:.3f} (n={p['n']})")
    for msg in ab.messages:
        print("message:", msg)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scaling_ab.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
