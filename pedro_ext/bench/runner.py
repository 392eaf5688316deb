"""Runs a preset's kernel- and model-level benchmarks and writes bench.json / bench.png."""
import json
import os
import platform
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

import pedro_ext

from .kernel_bench import KernelBench
from .model_bench import ModelBench
from .presets import Preset


def machine_info(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                device=str(device), pedro_ext=pedro_ext.build_info())
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(preset: Preset, device: torch.device, out_dir: Optional[str] = None,
        cuda_graph: bool = False, levels=("kernel", "model"), progress: bool = True) -> dict:
    t0 = time.time()
    kb = KernelBench(preset, device, cuda_graph) if "kernel" in levels else None
    mb = ModelBench(preset, device) if "model" in levels else None
    total = (kb.count() if kb else 0) + (mb.count() if mb else 0)
    rows = []
    summary = dict(preset=preset.name, dtype=preset.dtype)
    with tqdm(total=total, desc=f"pedro_ext.bench[{preset.name}]", disable=not progress) as bar:
        if kb:
            rows += kb.rows(bar)
            summary["modulate_bandwidth"] = kb.modulate_bandwidth()
        if mb:
            rows += mb.rows(bar)
            summary.update(pedro_params_per_adapter=mb.pedro_params, lora_rank=mb.lora_rank,
                           lora_params_per_adapter=mb.lora_params,
                           lora_targets=["q_proj", "v_proj"], model=dict(preset.model))
    summary["wall_s"] = time.time() - t0
    result = dict(machine=machine_info(device), preset=preset.__dict__, summary=summary, rows=rows)
    if out_dir:
        from .report import plot
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        plot(result, os.path.join(out_dir, "bench.png"))
    return result
