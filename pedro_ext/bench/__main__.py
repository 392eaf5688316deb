"""python -m pedro_ext.bench [--quick] [--preset cpu|gpu|tiny] [--device cpu|cuda] [--out DIR]"""
import argparse
import json

import torch

from .presets import PRESETS, quick
from .report import pedro_vs_lora, table
from .runner import run


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pedro_ext.bench", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: 'gpu' on a CUDA device, else 'cpu'")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 2 min on CPU)")
    ap.add_argument("--out", default=None, help="write DIR/bench.json and DIR/bench.png")
    ap.add_argument("--cuda-graph", action="store_true", help="kernel level: time CUDA-graph replays")
    ap.add_argument("--level", choices=["kernel", "model", "both"], default="both")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if args.quick:
        preset = quick(preset)
    levels = ("kernel", "model") if args.level == "both" else (args.level,)
    result = run(preset, device, args.out, args.cuda_graph, levels)
    m = result["machine"]
    print(f"\nmachine: {m['device_name']} ({m['device']}), torch {m['torch']}, "
          f"{m['cpu_count']} CPUs; preset {preset.name}, {preset.dtype}")
    for level, phase in [("kernel", "decode"), ("kernel", "prefill"), ("model", "decode"),
                         ("model", "prefill")]:
        if any(r["level"] == level and r["phase"] == phase for r in result["rows"]):
            print(f"\n## {level} level, {phase}\n")
            print(table(result["rows"], level, phase))
    if "kernel" in levels:
        print("\n## kernel-level decode, LoRA time / PEDRO time\n")
        print(pedro_vs_lora(result["rows"]))
    print("\nsummary:", json.dumps(result["summary"], indent=1, default=str))


if __name__ == "__main__":
    main()
