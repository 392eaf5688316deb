"""Time to first token against the number of adapters loaded: PEDRO at one request, beside the
bare model, with N adapters in the banks (the request reads one of them). A serving process keeps
many adapters loaded, so a prefill must not pay for the ones it does not read.

    python -m bench.prefill_adapters [--adapters 32 256 1024] [--rounds 20] [--out DIR]

Each round times one generate call with one new token (the prefill) for the bare model and for
PEDRO, in alternating order; the table gives each side's median and the median of the paired
differences with their IQR. Writes DIR/prefill_adapters.json. The model is the CPU preset's
(SmolLM2-135M-Instruct, fp32)."""
import argparse
import json
import os
import statistics
import time

import torch

from pedro_ext.bench.model_bench import ModelBench
from pedro_ext.bench.presets import PRESETS
from pedro_ext.bench.runner import machine_info


def measure(adapters: int, rounds: int) -> dict:
    # the preset loads one adapter per request of its largest batch
    bench = ModelBench(PRESETS["cpu"].replace(model_batches=(1, adapters)), torch.device("cpu"),
                       methods=("base",))
    ids, mask = bench._prompts(1)
    generate = {m: bench._setup(m) for m in ("base", "pedro")}
    pedro = generate["pedro"].pedro
    if len(pedro.peft_config) != adapters:
        raise RuntimeError(f"PEDRO holds {len(pedro.peft_config)} adapters, {adapters} were asked for")

    def ttft_ms(method):
        computed = pedro.vector_computations
        start = time.perf_counter()
        with torch.no_grad():
            generate[method](1, input_ids=ids, attention_mask=mask, max_new_tokens=1,
                             min_new_tokens=1, do_sample=False, pad_token_id=0)
        elapsed = (time.perf_counter() - start) * 1e3
        want = len(pedro.banks) if method == "pedro" else 0  # PEDRO's prefill ran, base's not
        if pedro.vector_computations - computed != want:
            raise RuntimeError(f"{method}: {pedro.vector_computations - computed} layers computed "
                               f"vectors, {want} expected; the figure would not be PEDRO's")
        return elapsed

    for method in ("base", "pedro") * 2:  # warm-up
        ttft_ms(method)
    times = {"base": [], "pedro": []}
    for i in range(rounds):
        for method in ("base", "pedro") if i % 2 else ("pedro", "base"):
            times[method].append(ttft_ms(method))
    deltas = [p - b for p, b in zip(times["pedro"], times["base"])]
    q1, _, q3 = statistics.quantiles(deltas, n=4)
    return dict(adapters=adapters, rounds=rounds, base_ms=statistics.median(times["base"]),
                pedro_ms=statistics.median(times["pedro"]), delta_ms=statistics.median(deltas),
                delta_q1_ms=q1, delta_q3_ms=q3, times_ms=times)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.prefill_adapters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 4 or args.rounds % 2:
        ap.error("--rounds must be even (each side first in half the rounds) and at least 4")
    if min(args.adapters) < 1:
        ap.error("--adapters: every count must be at least 1")
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.rounds) for n in args.adapters]
    print("| adapters loaded | base TTFT ms | PEDRO TTFT ms | PEDRO - base, median (IQR) ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['adapters']} | {r['base_ms']:.1f} | {r['pedro_ms']:.1f} | "
              f"{r['delta_ms']:.1f} ({r['delta_q1_ms']:.1f} .. {r['delta_q3_ms']:.1f}) |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefill_adapters.json"), "w") as f:
            json.dump(dict(machine=machine_info(torch.device("cpu")), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
