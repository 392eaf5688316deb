"""Serving throughput with vLLM on one model: the bare model vs PEDRO (every request its own
adapter) vs vLLM's multi-LoRA (every request its own LoRA), at matched adapter parameters.

Run inside the vLLM environment (vllm_tests/setup_env.sh builds it):
    .venv-vllm/bin/python bench/vllm_serving.py --out bench/results/vllm-cpu
The model folder defaults to SmolLM2-135M-Instruct as pedro_ext.offline.load_smollm2 caches it
(create it once from the main environment: python -c "import pedro_ext.offline as o;
o.load_smollm2()").

Each variant runs in its own process with its own engine (vLLM's default: compiled); the parent
alternates them round by round, in a balanced order (pedro_ext.bench.timing.round_order), so
load on a shared machine hits all three alike. A round adds the batch of requests and runs the engine step by step, timing each step
(wall and this process's CPU time): decode figures are the median step that starts no prompt."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

from pedro_ext.bench.timing import round_order

VARIANTS = ("base", "pedro", "lora")
LORA_TARGETS = ("q_proj", "v_proj", "up_proj")


# --------------------------------------------------------------------------- adapters
def make_pedro_bank(model_dir, folder, count, r, seed):
    """count PEDRO adapters (Q, V, up; mean pooling) with non-trivial weights, one folder each."""
    import torch
    import transformers
    from pedro_ext import PedroConfig, get_pedro_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pedro = get_pedro_model(base, PedroConfig(r=r), adapter_name="t0")
    for i in range(1, count):
        pedro.add_adapter(f"t{i}", PedroConfig(r=r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(count):
            for p in pedro.adapter_parameters(f"t{i}"):
                if p.dim() == 2 and p.shape[0] == r:  # w_up: vectors move away from 1
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    # save_pretrained writes "default" at the top, the others in sub-folders: all are "t<i>"
    pedro.save_pretrained(folder)
    return pedro.adapter_num_parameters("t0")


def make_lora_bank(model_dir, folder, count, rank, seed):
    """count LoRA adapters in peft's format (rank, Q / V / up, random A and B)."""
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    out = {"q_proj": heads * head_dim, "v_proj": kv * head_dim, "up_proj": cfg["intermediate_size"]}
    section = {"q_proj": "self_attn", "v_proj": "self_attn", "up_proj": "mlp"}
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        state = {}
        for layer in range(cfg["num_hidden_layers"]):
            for t in LORA_TARGETS:
                key = f"base_model.model.model.layers.{layer}.{section[t]}.{t}"
                state[f"{key}.lora_A.weight"] = torch.randn(rank, d, generator=g) * d ** -0.5
                state[f"{key}.lora_B.weight"] = torch.randn(out[t], rank, generator=g) * 0.02
        path = os.path.join(folder, f"t{i}")
        os.makedirs(path, exist_ok=True)
        save_file(state, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": list(LORA_TARGETS), "bias": "none",
                       "base_model_name_or_path": model_dir, "task_type": "CAUSAL_LM"}, f)
        paths.append(path)
    return paths, sum(t.numel() for t in state.values())


# --------------------------------------------------------------------------- workers
def worker(variant, args, bank_dir, lora_paths, conn):
    """Hosts one engine; answers ("run", tag) with the round's timings."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    common = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.requests,
                  distributed_executor_backend="uni", seed=0, enforce_eager=args.eager)
    if variant == "pedro":
        from pedro_ext.serving_vllm import engine_kwargs
        llm = LLM(args.model_dir, **engine_kwargs(bank_dir, **common))
    elif variant == "lora":
        # LoRA only where the adapters are (vLLM wraps every supported Linear otherwise)
        llm = LLM(args.model_dir, enable_lora=True, max_loras=args.requests,
                  max_cpu_loras=args.requests, max_lora_rank=args.lora_rank,
                  lora_target_modules=["qkv_proj", "gate_up_proj"],
                  enable_chunked_prefill=False, enable_prefix_caching=False, **common)
    else:
        llm = LLM(args.model_dir, enable_chunked_prefill=False, enable_prefix_caching=False,
                  **common)

    import torch
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(100, 40000, (args.prompt_len,),
                                                  generator=g).tolist()}
               for _ in range(args.requests)]

    def params(n, i):
        extra = {"pedro_adapter": f"t{i}"} if variant == "pedro" else None
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra)

    loras = ([LoRARequest(f"t{i}", i + 1, p) for i, p in enumerate(lora_paths)]
             if variant == "lora" else [None] * args.requests)
    engine = llm.llm_engine

    def run(tag):
        """All requests at once, then engine steps one by one: each step's wall and CPU time
        (this process, all threads) and how many prompts it started."""
        for i in range(args.requests):
            engine.add_request(f"{tag}-{i}", prompts[i], params(args.new_tokens, i),
                               lora_request=loras[i])
        steps, tokens, started = [], {}, 0
        while engine.has_unfinished_requests():
            wall, cpu = time.perf_counter(), time.process_time()
            outs = engine.step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            first = sum(1 for o in outs if len(o.outputs[0].token_ids) == 1)
            started += first
            steps.append({"wall_s": wall, "cpu_s": cpu, "prefills": first})
            for o in outs:
                if o.finished:
                    tokens[int(o.request_id.rsplit("-", 1)[1])] = list(o.outputs[0].token_ids)
        if started != args.requests or any(len(tokens[i]) != args.new_tokens
                                           for i in range(args.requests)):
            raise RuntimeError(f"{variant}: requests did not all produce {args.new_tokens} tokens")
        return steps, [tokens[i] for i in range(args.requests)]

    conn.send(("ready", None))
    rounds = 0
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        steps, tokens = run(f"round{rounds}")
        rounds += 1
        conn.send(("result", {"steps": steps, "tokens": tokens}))


# --------------------------------------------------------------------------- driver
def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(samples, args):
    """Per variant, over rounds: a decode step's wall and CPU time (median over the round's
    steps that start no prompt), as tokens/s for the batch; the prefill step(s); end to end.
    CPU time is this engine process's (all threads): it leaves out time spent waiting for a core
    on a shared machine. Medians relative to the base model."""
    rows = {}
    for variant, runs in samples.items():
        figures = {k: [] for k in ("decode_tokens_per_s", "decode_tokens_per_cpu_s",
                                   "e2e_tokens_per_s", "e2e_tokens_per_cpu_s", "prefill_ms")}
        for steps in runs:
            decode = [s for s in steps if s["prefills"] == 0]
            prefill = [s for s in steps if s["prefills"] > 0]
            if len(decode) < args.new_tokens - 2:
                raise RuntimeError(f"{variant}: only {len(decode)} pure decode steps")
            figures["decode_tokens_per_s"].append(
                args.requests / statistics.median(s["wall_s"] for s in decode))
            figures["decode_tokens_per_cpu_s"].append(
                args.requests / statistics.median(s["cpu_s"] for s in decode))
            total = args.requests * args.new_tokens
            figures["e2e_tokens_per_s"].append(total / sum(s["wall_s"] for s in steps))
            figures["e2e_tokens_per_cpu_s"].append(total / sum(s["cpu_s"] for s in steps))
            figures["prefill_ms"].append(1e3 * sum(s["wall_s"] for s in prefill))
        for name, values in figures.items():
            if not all(0 < v < 1e7 for v in values):
                raise RuntimeError(f"{variant}: impossible {name} {values}")
        rows[variant] = {k: _spread(v) for k, v in figures.items()}
    for variant in rows:
        for key in [k for k in rows[variant] if k.endswith(("_per_s", "_per_cpu_s"))]:
            rows[variant][key]["vs_base"] = (rows[variant][key]["median"]
                                             / rows["base"][key]["median"])
    return rows


def markdown(report) -> str:
    setup, params, res = report["setup"], report["adapter_parameters"], report["results"]
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores, shared with other jobs: load average "
        f"{m['load_average_at_start'][0]:.1f} at start, {m['load_average_at_end'][0]:.1f} at "
        f"end), vLLM {report['versions']['vllm']}, torch {report['versions']['torch']}, "
        f"{setup['dtype']}, {'eager' if setup['eager'] else 'compiled (vLLM default)'}.",
        f"Workload: {setup['requests']} requests at once, {setup['prompt_len']}-token prompts, "
        f"{setup['new_tokens']} new tokens each, greedy; every adapter request its own adapter; "
        f"{setup['rounds']} interleaved rounds after a warm-up round.",
        f"Adapters: PEDRO r={setup['pedro_r']} on Q, V, up ({params['pedro']:,} parameters); "
        f"LoRA rank {setup['lora_rank']} on q_proj, v_proj, up_proj ({params['lora']:,}).",
        "Decode: the batch's tokens/s from the median pure-decode step of a round; median over "
        "rounds (min-max), and the best round. Prefill: the step(s) that start the prompts.",
        "",
        "| variant | decode tok/s, median of rounds | vs base | decode tok/s, best round | "
        "vs base | prefill ms, median of rounds | prefill ms, best round | vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"base": "vLLM, base model", "pedro": "vLLM + PEDRO", "lora": "vLLM multi-LoRA"}
    base = res["base"]
    for v in (v for v in VARIANTS if v in res):
        d, p = res[v]["decode_tokens_per_s"], res[v]["prefill_ms"]
        lines.append(
            f"| {names[v]} | {d['median']:.0f} ({d['min']:.0f}-{d['max']:.0f}) | "
            f"{d['median'] / base['decode_tokens_per_s']['median']:.2f}x | {d['max']:.0f} | "
            f"{d['max'] / base['decode_tokens_per_s']['max']:.2f}x | {p['median']:.0f} "
            f"({p['min']:.0f}-{p['max']:.0f}) | {p['min']:.0f} | "
            f"{p['min'] / base['prefill_ms']['min']:.2f}x |")
    lines += ["", "End-to-end and CPU-time figures are in vllm_serving.json; on this shared "
              "machine whole rounds include stalls of seconds that hit every variant, so only "
              "the per-step figures are read."]
    return "\n".join(lines) + "\n"


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=os.path.join(
        os.environ.get("PEDRO_EXT_CACHE") or os.path.expanduser("~/.cache/pedro_ext"),
        "smollm2-135m-instruct"))
    ap.add_argument("--out", default="bench/results/vllm-cpu")
    ap.add_argument("--requests", type=int, default=16, help="batch: requests sent at once")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--pedro-r", type=int, default=10)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="which engines to run (base always; e.g. base pedro to skip LoRA)")
    ap.add_argument("--table-from", metavar="JSON", help="only rewrite the table of a past run")
    args = ap.parse_args()
    variants = tuple(v for v in VARIANTS if v in args.variants)
    if "base" not in variants:
        ap.error("--variants must include base (every ratio is to it)")
    if args.table_from:
        with open(args.table_from) as f:
            table = markdown(json.load(f))
        with open(os.path.join(os.path.dirname(args.table_from), "vllm_serving.md"), "w") as f:
            f.write(table)
        print(table)
        return
    host = machine()
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"no Hugging Face model folder at {args.model_dir}: create it with "
                 "python -c 'import pedro_ext.offline as o; o.load_smollm2()' (main environment)")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pedro-vllm-bench-")  # adapters: not results
    import vllm
    import torch

    pedro_params = make_pedro_bank(args.model_dir, os.path.join(work, "pedro"), args.requests,
                                   args.pedro_r, seed=0)
    lora_paths, lora_params = make_lora_bank(args.model_dir, os.path.join(work, "lora"),
                                             args.requests, args.lora_rank, seed=0)
    print(f"adapter parameters: PEDRO r={args.pedro_r} {pedro_params:,}, LoRA rank "
          f"{args.lora_rank} {lora_params:,}", flush=True)

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for variant in variants:  # one engine at a time starts (compiling), then all stay up
        parent, child = ctx.Pipe()
        procs[variant] = ctx.Process(target=worker, args=(variant, args, os.path.join(work, "pedro"),
                                                          lora_paths, child))
        procs[variant].start()
        conns[variant] = parent
        if parent.recv()[0] != "ready":
            raise RuntimeError(f"{variant} engine did not start")
        print(f"{variant} engine ready", flush=True)
    samples = {v: [] for v in variants}
    first_tokens = {}
    try:
        for v in variants:  # warm-up round, not counted
            conns[v].send("run")
            first_tokens[v] = conns[v].recv()[1]["tokens"]
        for rnd in range(args.rounds):
            for v in round_order(variants, rnd):
                conns[v].send("run")
                result = conns[v].recv()[1]
                if result["tokens"] != first_tokens[v]:
                    raise RuntimeError(f"{v}: greedy outputs changed between rounds")
                samples[v].append(result["steps"])
                print(f"round {rnd} {v}: {sum(s['wall_s'] for s in result['steps']):.2f} s wall, "
                      f"{sum(s['cpu_s'] for s in result['steps']):.2f} s CPU", flush=True)
    finally:
        for v in procs:
            if procs[v].is_alive():
                conns[v].send("stop")
                procs[v].join(timeout=60)
    for v in variants[1:]:
        if first_tokens[v] == first_tokens["base"]:
            raise RuntimeError(f"{v}: the adapters did not change any output (not applied?)")
    rows = summarize(samples, args)
    report = {
        "machine": dict(host, load_average_at_end=os.getloadavg()),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
        "adapter_parameters": {"pedro": pedro_params, "lora": lora_params},
        "samples": samples,
        "results": rows,
    }
    with open(os.path.join(args.out, "vllm_serving.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "vllm_serving.md"), "w") as f:
        f.write(markdown(report))
    print(json.dumps({"machine": report["machine"], "results": rows}, indent=2))


if __name__ == "__main__":
    main()
