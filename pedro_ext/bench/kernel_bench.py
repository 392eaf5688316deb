"""Kernel level: one layer's adapted modules (Q, V, FFN-up) at a decode step and at prefill.

Every method computes the three base projections plus its adapter; `median_ms` is that total,
`adapter_ms` the adapter part alone (the base outputs given), both medians over repeats that
rotate through ROTATE input / adapter-id sets so the timing does not sit in cache."""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

import pedro_ext

from .lora import lora_bmm, lora_peft, lora_single, row_groups
from .presets import Preset
from .timing import copy_bandwidth_gbs, median_ms

ROTATE = 3
METHODS = ("base", "pedro", "lora_bmm", "lora_peft", "lora_single")


def distinct_counts(batch: int) -> List[int]:
    return sorted({1, max(1, round(math.sqrt(batch))), batch})


class KernelBench:
    def __init__(self, preset: Preset, device: torch.device, cuda_graph: bool = False):
        if preset.bank < max(preset.batches):
            raise ValueError(f"preset {preset.name}: bank N={preset.bank} is smaller than the "
                             f"largest batch {max(preset.batches)} (which uses N distinct adapters)")
        self.p, self.device, self.cuda_graph = preset, device, cuda_graph
        self.dtype = getattr(torch, preset.dtype)
        self.es = torch.empty(0, dtype=self.dtype).element_size()
        g = torch.Generator().manual_seed(0)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, self.dtype)  # noqa: E731
        d, outs = preset.d, preset.outs
        self.weights = [mk(o, d, scale=d ** -0.5) for o in outs]
        big_d = sum(outs)
        self.slices = [(sum(outs[:i]), sum(outs[:i + 1])) for i in range(3)]
        n, r = preset.bank, preset.pedro_r
        bank = dict(w_down=mk(n, d, r, scale=d ** -0.5), b_down=mk(n, r, scale=0.1),
                    rat_num=mk(n, 6, scale=0.1), rat_den=mk(n, 4, scale=0.1),
                    w_up=mk(n, r, big_d, scale=0.1), b_up=mk(n, big_d, scale=0.1))
        self.pedro_bank = [bank[k] for k in ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")]
        self.lora_banks: Dict[int, list] = {}
        self.gen = g

    def lora_bank(self, r):
        if r not in self.lora_banks:
            mk = lambda *s, scale: (torch.randn(*s, generator=self.gen) * scale).to(self.device, self.dtype)  # noqa: E731
            self.lora_banks[r] = [(mk(self.p.bank, self.p.d, r, scale=self.p.d ** -0.5),
                                   mk(self.p.bank, r, o, scale=0.01)) for o in self.p.outs]
        return self.lora_banks[r]

    def _inputs(self, batch, tokens, distinct):
        sets = []
        for i in range(ROTATE):
            gi = torch.Generator().manual_seed(1000 * i + batch + distinct)
            chosen = torch.randperm(self.p.bank, generator=gi)[:distinct]
            # exactly `distinct` adapters, spread evenly over the rows in a random order
            idx_cpu = chosen[torch.arange(batch) % distinct][torch.randperm(batch, generator=gi)]
            x = torch.randn(batch, tokens, self.p.d, generator=gi).to(self.device, self.dtype)
            idx = idx_cpu.to(self.device)
            pooled = x.mean(1)
            vectors = pedro_ext.generate(pooled, idx, *self.pedro_bank)
            ys = [F.linear(x, w) for w in self.weights]
            sets.append(dict(x=x, idx=idx, groups=row_groups(idx_cpu, self.device), ys=ys,
                             vectors=vectors, single=int(chosen[0])))
        return sets

    def _fns(self, phase, sets, r):
        """{method: (total fn, adapter-only fn)}."""
        lb = self.lora_bank(r) if r else None
        scale = 2.0
        W = self.weights

        def base(i, s=None):
            s = s or sets[i % ROTATE]
            return [F.linear(s["x"], w) for w in W]

        def pedro_adapter(s, ys):
            v = s["vectors"]
            if phase == "prefill":  # pooling + generator run at prefill
                v = pedro_ext.generate(s["x"].mean(1), s["idx"], *self.pedro_bank)
            return [pedro_ext.modulate(y, v[:, a:b]) for y, (a, b) in zip(ys, self.slices)]

        def pedro_fused_adapter(s, ys):
            pooled = s["x"].mean(1)
            wd, bd, num, den, wu, bu = self.pedro_bank
            return [pedro_ext.generate_and_modulate(y, pooled, s["idx"], wd, bd, num, den,
                                                    wu[:, :, a:b], bu[:, a:b])[0]
                    for y, (a, b) in zip(ys, self.slices)]

        def lora_bmm_adapter(s, ys):
            return [lora_bmm(s["x"], y, a, b, s["idx"], scale) for y, (a, b) in zip(ys, lb)]

        def lora_peft_adapter(s, ys):
            return [lora_peft(s["x"], y, a, b, s["groups"], scale) for y, (a, b) in zip(ys, lb)]

        def lora_single_adapter(s, ys):
            k = s["single"]
            return [lora_single(s["x"], y, a[k], b[k], scale) for y, (a, b) in zip(ys, lb)]

        adapters = {"pedro": pedro_adapter, "lora_bmm": lora_bmm_adapter,
                    "lora_peft": lora_peft_adapter, "lora_single": lora_single_adapter,
                    "pedro_fused": pedro_fused_adapter}
        fns = {"base": (base, None)}
        for name, fn in adapters.items():
            if (name.startswith("lora") and lb is None) or (name == "pedro_fused" and phase != "prefill"):
                continue
            fns[name] = (lambda i, fn=fn: fn(sets[i % ROTATE], base(i)),
                         lambda i, fn=fn: fn(sets[i % ROTATE], sets[i % ROTATE]["ys"]))
        return fns

    def _bytes(self, method, batch, tokens, distinct, r):
        d, outs, es = self.p.d, self.p.outs, self.es
        act = sum(batch * tokens * (d + 2 * o) for o in outs) * es  # x read, y read + written
        if method.startswith("pedro"):
            return sum(batch * tokens * 2 * o + batch * o for o in outs) * es
        adapters = 1 if method == "lora_single" else distinct
        return act + adapters * sum(r * (d + o) for o in outs) * es

    def rows(self, progress=None) -> List[dict]:
        out = []
        plan = [(phase, b, k) for phase in ("decode", "prefill") for b in self.p.batches
                for k in distinct_counts(b)]
        for phase, batch, distinct in plan:
            tokens = 1 if phase == "decode" else self.p.prompt_len
            sets = self._inputs(batch, tokens, distinct)
            measured = {}
            for r in (None, *self.p.ranks):
                for method, (total, adapter_only) in self._fns(phase, sets, r).items():
                    if r is not None and not method.startswith("lora"):
                        continue  # base and PEDRO do not depend on LoRA's rank
                    graph = self.cuda_graph and self.device.type == "cuda" and method != "lora_peft"
                    t = median_ms(total, self.device, self.p.warmup, self.p.repeats, graph)
                    a = median_ms(adapter_only, self.device, self.p.warmup, self.p.repeats, graph) \
                        if adapter_only else 0.0
                    rank = r if r is not None else (self.p.pedro_r if method.startswith("pedro") else 0)
                    row = dict(level="kernel", phase=phase, method=method.replace("_fused", ""),
                               variant="fused" if method == "pedro_fused" else None,
                               batch_size=batch, distinct_adapters=distinct, rank=rank,
                               tokens=batch * tokens, median_ms=t, adapter_ms=a,
                               cuda_graph=graph)
                    if method != "base":
                        nbytes = self._bytes(method, batch, tokens, distinct, rank)
                        row["adapter_gbs"] = nbytes / (a * 1e-3) / 1e9 if a > 0 else None
                    measured[(method, r)] = row
                    out.append(row)
                    if progress is not None:
                        progress.update(1)
            for (method, r), row in measured.items():
                if method.startswith("pedro"):
                    row["ratio_vs"] = {f"{m}_r{rr}": measured[(m, rr)]["median_ms"] / row["median_ms"]
                                       for (m, rr) in measured if m.startswith("lora")}
                    row["overhead_vs_base"] = row["median_ms"] / measured[("base", None)]["median_ms"] - 1
        return out

    def count(self) -> int:
        n = 0
        for phase in ("decode", "prefill"):
            methods = 2 + (1 if phase == "prefill" else 0) + 3 * len(self.p.ranks)
            n += sum(len(distinct_counts(b)) for b in self.p.batches) * methods
        return n

    def modulate_bandwidth(self) -> dict:
        """modulate alone on a large input against the measured copy bandwidth."""
        b, t, dd = max(self.p.batches), self.p.prompt_len, max(self.p.outs)
        x = torch.randn(b, t, dd, device=self.device).to(self.dtype)
        v = torch.randn(b, dd, device=self.device).to(self.dtype)
        ms = median_ms(lambda i: pedro_ext.modulate(x, v), self.device, self.p.warmup, self.p.repeats)
        gbs = (2 * x.numel() + v.numel()) * self.es / (ms * 1e-3) / 1e9
        copy = copy_bandwidth_gbs(x.numel(), self.dtype, self.device, self.p.warmup, self.p.repeats)
        # an out-of-place op also pays for its fresh output buffer: clone() is that baseline
        clone_ms = median_ms(lambda i: x.clone(), self.device, self.p.warmup, self.p.repeats)
        clone = 2 * x.numel() * self.es / (clone_ms * 1e-3) / 1e9
        return dict(shape=[b, t, dd], modulate_ms=ms, modulate_gbs=gbs, copy_gbs=copy,
                    fraction_of_copy=gbs / copy, clone_gbs=clone, fraction_of_clone=gbs / clone)
