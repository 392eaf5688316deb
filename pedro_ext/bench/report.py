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
