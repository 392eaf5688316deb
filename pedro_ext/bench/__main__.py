"""python -m pedro_ext.bench [--quick] [--preset cpu|gpu|tiny] [--device cpu|cuda] [--out DIR]
[--compile] [--cuda-graph] [--methods ...] [--batches ...] [--rounds N] [--time-limit SECONDS]
[--profile-ops]"""
import argparse
import time

import torch

from .model_bench import METHODS as MODEL_METHODS
from .presets import PRESETS, quick
from .report import console_report
from .runner import run


def main(argv=None):
    t0 = time.time()
    ap = argparse.ArgumentParser(prog="python -m pedro_ext.bench", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: 'gpu' on a CUDA device, else 'cpu'")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes and repeats, a small random model (< 2 min on a CPU)")
    ap.add_argument("--out", default=None, help="write DIR/bench.json and DIR/bench.png")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="kernel level: time CUDA-graph replays; model level: the decode step "
                         "in CUDA graphs (torch.compile backend 'cudagraphs' with HF's static "
                         "cache; with --compile: inductor's reduce-overhead mode)")
    ap.add_argument("--compile", action="store_true",
                    help="model level: the decode step compiled by torch.compile (inductor) "
                         "with HF's static cache")
    ap.add_argument("--level", choices=["kernel", "model", "both"], default="both")
    ap.add_argument("--methods", nargs="+", choices=MODEL_METHODS, default=list(MODEL_METHODS),
                    help="model-level methods (default: all)")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="model-level batch sizes (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="model-level interleaved timed rounds (default: the preset's); more "
                         "rounds narrow the ratio's range on a noisy machine; a multiple of the "
                         "number of methods (twice it when odd) completes the balanced order")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="start no new batch size / configuration after this many seconds "
                         "(what was measured is kept and the cut is reported)")
    ap.add_argument("--profile-ops", action="store_true",
                    help="model level: after the timed rounds, profile one more call per method "
                         "and batch size by operator (decoding steps only, untimed)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.cuda_graph and device.type != "cuda":
        ap.error("--cuda-graph needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if args.quick:
        preset = quick(preset)
    if args.batches:
        if min(args.batches) < 1:
            ap.error(f"--batches must be positive, got {args.batches}")
        preset = preset.replace(model_batches=tuple(args.batches))
    if args.rounds is not None:
        if args.rounds < 1:
            ap.error(f"--rounds must be at least 1, got {args.rounds}")
        preset = preset.replace(model_rounds=args.rounds)
    mode = {(False, False): "eager", (True, False): "compiled", (False, True): "cuda_graph",
            (True, True): "compiled+cuda_graph"}[(args.compile, args.cuda_graph)]
    levels = ("kernel", "model") if args.level == "both" else (args.level,)
    if "base" not in args.methods:
        ap.error("--methods must include base (every ratio is to it)")
    result = run(preset, device, args.out, args.cuda_graph, levels, model_mode=mode,
                 model_methods=args.methods, time_limit_s=args.time_limit,
                 profile_ops=args.profile_ops)
    print(console_report(result))
    print(f"\nwall time: {time.time() - t0:.1f} s (benchmark {result['summary']['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
