"""Tables and the plot of a benchmark result."""
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHOD_ORDER = ("base", "pedro", "pedro_reference", "lora_single", "lora_bmm", "lora_peft")


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(rows: List[dict], level: str, phase: str) -> str:
    rows = [r for r in rows if r["level"] == level and r["phase"] == phase]
    if level == "kernel":
        cols = ["batch_size", "distinct_adapters", "method", "variant", "rank", "median_ms",
                "adapter_ms", "adapter_gbs"]
    else:
        cols = ["batch_size", "distinct_adapters", "method", "rank", "params_per_adapter",
                "median_ms", "tokens_per_s", "tokens_per_s_vs_base", "prefill_ms"]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows = sorted(rows, key=lambda r: (r["batch_size"], r["distinct_adapters"],
                                       order.get(r["method"], 9), r.get("variant") or "",
                                       r["rank"]))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def pedro_vs_lora(rows: List[dict]) -> str:
    """Kernel-level decode: LoRA time / PEDRO time for each LoRA variant and rank."""
    lines = ["| batch | distinct | " + "variant | LoRA ms / PEDRO ms |", "|---|---|---|---|"]
    for r in rows:
        if r["level"] == "kernel" and r["phase"] == "decode" and r["method"] == "pedro":
            for k, v in sorted(r["ratio_vs"].items()):
                lines.append(f"| {r['batch_size']} | {r['distinct_adapters']} | {k} | {v:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    model_rows = [r for r in rows if r["level"] == "model" and r["phase"] == "decode"]
    ax = axes[0]
    for m in METHOD_ORDER:
        pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in model_rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="batch size (requests, distinct adapters)",
           ylabel="decode tokens/s", title="Model level: multi-tenant decoding")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax = axes[1]
    kr = [r for r in rows if r["level"] == "kernel" and r["phase"] == "decode"
          and r["distinct_adapters"] == r["batch_size"]]
    ranks = sorted({r["rank"] for r in kr if r["method"].startswith("lora")})
    rank = ranks[len(ranks) // 2] if ranks else None
    for m in METHOD_ORDER:
        pts = sorted((r["batch_size"], r["median_ms"]) for r in kr if r["method"] == m
                     and (not m.startswith("lora") or r["rank"] == rank))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m + (f" (r={rank})" if m.startswith("lora") else ""))
    ax.set(xscale="log", yscale="log", xlabel="batch size (all adapters distinct)",
           ylabel="ms per decode step (Q, V, up of one layer)", title="Kernel level: decode step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    mach = result["machine"]
    fig.suptitle(f"pedro_ext.bench preset={result['summary']['preset']} on {mach['device_name']} "
                 f"({result['summary']['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_tables(result: dict, rank: int = 16) -> str:
    """The compact tables the README quotes, generated from a bench.json."""
    rows, m, s = result["rows"], result["machine"], result["summary"]
    out = [f"Machine: {m['device_name']} ({m['cpu_count']} CPUs, torch {m['torch']}), preset "
           f"`{s['preset']}`, {s['dtype']}.", ""]
    out += ["Kernel level, one decode step of one layer's Q, V, up (base projections + adapter), "
            f"all adapters distinct, LoRA rank {rank}; ms (median):", "",
            "| batch | base | PEDRO | LoRA single | LoRA bmm | LoRA peft loop | PEDRO adapter part | LoRA bmm adapter part |",
            "|---|---|---|---|---|---|---|---|"]
    kd = [r for r in rows if r["level"] == "kernel" and r["phase"] == "decode"
          and r["distinct_adapters"] == r["batch_size"]]
    for b in sorted({r["batch_size"] for r in kd}):
        get = lambda meth: next((r for r in kd if r["batch_size"] == b and r["method"] == meth  # noqa: E731
                                 and (not meth.startswith("lora") or r["rank"] == rank)), None)
        cells = [get(x) for x in ("base", "pedro", "lora_single", "lora_bmm", "lora_peft")]
        vals = [f"{c['median_ms']:.3f}" if c else "-" for c in cells]
        out.append(f"| {b} | " + " | ".join(vals) + f" | {cells[1]['adapter_ms']:.3f} | "
                   f"{cells[3]['adapter_ms']:.3f} |")
    mb = s.get("modulate_bandwidth")
    if mb:
        out += ["", f"modulate alone on {mb['shape']}: {mb['modulate_gbs']:.1f} GB/s against a measured "
                f"copy bandwidth of {mb['copy_gbs']:.1f} GB/s into a preallocated buffer "
                f"({100 * mb['fraction_of_copy']:.0f}%) and {mb.get('clone_gbs', float('nan')):.1f} GB/s "
                f"for clone(), which like modulate allocates its output "
                f"({100 * mb.get('fraction_of_clone', float('nan')):.0f}%)."]
    md = [r for r in rows if r["level"] == "model" and r["phase"] == "decode"]
    if md:
        out += ["", f"Model level (random-weight Llama, {s['model']['num_hidden_layers']} layers, hidden "
                f"{s['model']['hidden_size']}), decode tokens/s, every request with its own adapter; "
                f"PEDRO r={result['preset']['pedro_r']} ({s['pedro_params_per_adapter']:,d} params/adapter), "
                f"LoRA r={s['lora_rank']} on q,v ({s['lora_params_per_adapter']:,d} params/adapter):", "",
                "| batch | base | PEDRO (kernels) | PEDRO (reference ops) | LoRA bmm | LoRA peft |",
                "|---|---|---|---|---|---|"]
        for b in sorted({r["batch_size"] for r in md}):
            cells = []
            for meth in ("base", "pedro", "pedro_reference", "lora_bmm", "lora_peft"):
                r = next(r for r in md if r["batch_size"] == b and r["method"] == meth)
                cells.append(f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_vs_base']:.2f}x)")
            out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys
    print(readme_tables(json.load(open(sys.argv[1]))))
