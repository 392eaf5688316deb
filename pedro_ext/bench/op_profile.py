"""Where a decoding step's time goes, operator by operator (`--profile-ops`).

After a batch size's timed rounds, each method makes one more generate call, untimed, under
torch.profiler. The profiler starts at the first token (from a StoppingCriteria, the hook the
step clock uses), so it records the decoding steps only, not the prefill. Per operator: self
time (CPU; on a GPU also device time) and calls, both per decoding step. The timed rounds
never run under the profiler, whose overhead would inflate them.

Why: a ratio to base says how much PEDRO costs, not where. Side by side with base, the table
shows which operators PEDRO adds (modulate_, act_mul_modulate), which it removes (the MLP's
mul), and what else moved.
"""
from typing import Callable, Dict, List, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import StoppingCriteria, StoppingCriteriaList


class _StartAtFirstToken(StoppingCriteria):
    def __init__(self, prof: profile, cuda: bool):
        self.prof, self.cuda, self.started = prof, cuda, False
        self._never = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if not self.started:
            if self.cuda:  # the prefill's kernels finish outside the profile
                torch.cuda.synchronize()
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool,
                                      device=input_ids.device)
            self.prof.start()
            self.started = True
        return self._never


def decode_op_profile(generate: Callable[..., torch.Tensor], new_tokens: int,
                      device: torch.device, **generate_kwargs) -> dict:
    """Profiles the decoding steps of one `generate(max_new_tokens=new_tokens, ...)` call.
    Returns {"steps": new_tokens - 1, "ops": {name: {"cpu_ms", "calls"[, "device_ms"]}}
    [, "device_total_ms"]}, every figure per decoding step. The operators are the host-side
    events (aten and custom ops, runtime calls, annotated ranges); an operator's device_ms is
    the time of the kernels it launched itself; device_total_ms sums every kernel once. Under
    CUDA graphs the kernels replay inside a graph launch: no operator gets their time, only
    device_total_ms has it."""
    if new_tokens < 2:
        raise ValueError(f"decode_op_profile: new_tokens must be >= 2 (one decoding step), "
                         f"got {new_tokens}")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    starter = _StartAtFirstToken(prof, cuda)
    try:
        out = generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       stopping_criteria=StoppingCriteriaList([starter]), **generate_kwargs)
        if cuda:
            torch.cuda.synchronize()
    finally:
        if starter.started:
            prof.stop()
    prompt = generate_kwargs.get("input_ids")
    if not starter.started or (prompt is not None
                               and out.shape[-1] != prompt.shape[-1] + new_tokens):
        raise RuntimeError(f"decode_op_profile: generate made {out.shape[-1]} tokens in all, "
                           f"{new_tokens} new ones were asked for")
    steps = new_tokens - 1
    ops: Dict[str, dict] = {}
    device_total = 0.0
    for e in prof.key_averages():
        if e.device_type == DeviceType.CPU:
            # one name can come as several entries (e.g. an annotation and an op): summed
            op = ops.setdefault(e.key, {"cpu_ms": 0.0, "calls": 0.0,
                                        **({"device_ms": 0.0} if cuda else {})})
            op["cpu_ms"] += e.self_cpu_time_total / 1e3 / steps
            op["calls"] += e.count / steps
            if cuda:
                op["device_ms"] += e.self_device_time_total / 1e3 / steps
        elif not getattr(e, "is_user_annotation", False):  # a kernel, memcpy or memset, counted once
            device_total += e.self_device_time_total / 1e3 / steps
    result = {"steps": steps, "ops": ops}
    if cuda:
        result["device_total_ms"] = device_total
    return result


def _time(op: Optional[dict], key: str) -> float:
    return op.get(key, 0.0) if op else 0.0


def _on_device(profiles: Dict[str, dict]) -> bool:
    return any("device_total_ms" in p for p in profiles.values())


def differing_ops(profiles: Dict[str, dict], base: str = "base", top: int = 12) -> List[str]:
    """Up to `top` operators, largest gap first: every operator that some method calls and
    base does not (what the method adds), then those whose self time per step differs most
    from base's (device time where recorded, else CPU time)."""
    key = "device_ms" if _on_device(profiles) else "cpu_ms"
    ref = profiles[base]["ops"]
    names = set().union(*(p["ops"] for p in profiles.values()))

    def gap(name):
        return max(abs(_time(p["ops"].get(name), key) - _time(ref.get(name), key))
                   for p in profiles.values())
    added = sorted((n for n in names if n not in ref), key=gap, reverse=True)[:top]
    rest = sorted((n for n in names if n in ref), key=gap, reverse=True)
    return sorted(added + rest[:top - len(added)], key=gap, reverse=True)


def profile_table(profiles: Dict[str, dict], labels: Dict[str, str], base: str = "base",
                  top: int = 12) -> str:
    """Markdown table: the operators that differ most from base, each method's self time per
    decoding step and calls per step; the last row sums every operator's self time."""
    methods = [base] + [m for m in profiles if m != base]
    device = _on_device(profiles)
    what = "self CPU ms / device ms per step (calls per step)" if device else \
        "self CPU ms per step (calls per step)"
    out = [f"| operator: {what} | " + " | ".join(labels.get(m, m) for m in methods) + " |",
           "|---|" + "---|" * len(methods)]

    def cell(op):
        if not op:
            return "-"
        t = f"{op['cpu_ms']:.3f}"
        if device:
            t += f" / {op.get('device_ms', 0.0):.3f}"
        return f"{t} ({op['calls']:g})"
    for name in differing_ops(profiles, base, top):
        out.append(f"| `{name}` | " + " | ".join(cell(profiles[m]["ops"].get(name))
                                                 for m in methods) + " |")
    totals = []
    for m in methods:
        ops = profiles[m]["ops"].values()
        t = f"{sum(o['cpu_ms'] for o in ops):.3f}"
        if device:
            t += f" / {profiles[m].get('device_total_ms', 0.0):.3f}"
        totals.append(t)
    out.append("| all operators (device: every kernel once) | " + " | ".join(totals) + " |"
               if device else "| all operators | " + " | ".join(totals) + " |")
    return "\n".join(out)
