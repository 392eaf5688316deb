"""Kernel level: one layer's adapted modules (Q, V, FFN-up) at a decode step and at prefill.

Every method computes the three base projections plus its adapter; `median_ms` is that total,
`adapter_ms` the adapter part alone (the base outputs given), both medians (with IQR) over
repeats that rotate through ROTATE input / adapter-id sets so the timing does not sit in cache,
taken in interleaved rounds across one configuration's methods.
lora_bgmv (the fused Triton kernels) runs only where Triton can (a CUDA device); elsewhere it is
skipped with the reason printed, and before it is timed its output is checked against
lora_bmm's on the same inputs."""
import functools
import math
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import pedro_ext

from .lora import lora_bmm, lora_peft, lora_single, row_groups
from .lora_bgmv import check_ids, lora_bgmv, unavailable_reason
from .presets import Preset
from .sanity import WeightFloor, refusal
from .timing import Stats, copy_bandwidth_gbs, measure, measure_interleaved

ROTATE = 3
# Each configuration's methods are timed in this many interleaved rounds (timing.round_order),
# so machine drift during a configuration falls on every method alike.
KERNEL_ROUNDS = 4
LORA_METHODS = ("lora_bmm", "lora_bgmv", "lora_peft", "lora_single")
METHODS = ("base", "pedro") + LORA_METHODS
AGREE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


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
        self.bgmv_skip = unavailable_reason(device)
        self.floor = WeightFloor(preset.d * sum(preset.outs) * self.es, self.dtype, device)
        self.messages: List[str] = []

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
            check_ids(idx_cpu, self.p.bank)
            x = torch.randn(batch, tokens, self.p.d, generator=gi).to(self.device, self.dtype)
            idx = idx_cpu.to(self.device)
            pooled = x.mean(1)
            vectors = pedro_ext.generate(pooled, idx, *self.pedro_bank)
            ys = [F.linear(x, w) for w in self.weights]
            sets.append(dict(x=x, idx=idx, groups=row_groups(idx_cpu, self.device), ys=ys,
                             scratch=[y.clone() for y in ys],  # for in-place adapters
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

        def lora_bgmv_adapter(s, ys):
            return [lora_bgmv(s["x"], y, a, b, s["idx"], scale) for y, (a, b) in zip(ys, lb)]

        def lora_peft_adapter(s, ys):
            return [lora_peft(s["x"], y, a, b, s["groups"], scale) for y, (a, b) in zip(ys, lb)]

        def lora_single_adapter(s, ys):
            k = s["single"]
            return [lora_single(s["x"], y, a[k], b[k], scale) for y, (a, b) in zip(ys, lb)]

        adapters = {"pedro": pedro_adapter, "lora_bmm": lora_bmm_adapter,
                    "lora_bgmv": lora_bgmv_adapter, "lora_peft": lora_peft_adapter,
                    "lora_single": lora_single_adapter, "pedro_fused": pedro_fused_adapter}
        fns = {"base": (base, None)}
        for name, fn in adapters.items():
            if (name.startswith("lora") and lb is None) or (name == "pedro_fused" and phase != "prefill") \
                    or (name == "lora_bgmv" and self.bgmv_skip):
                continue
            given = "scratch" if name == "lora_bgmv" else "ys"  # bgmv adds into its y in place
            fns[name] = (lambda i, fn=fn: fn(sets[i % ROTATE], base(i)),
                         lambda i, fn=fn, given=given: fn(sets[i % ROTATE], sets[i % ROTATE][given]))
        return fns

    def _bgmv_disagreement(self, sets, r) -> Optional[str]:
        """lora_bgmv against lora_bmm on the first input set: None when they agree."""
        s, scale = sets[0], 2.0
        for y, (a, b) in zip(s["ys"], self.lora_bank(r)):
            want = lora_bmm(s["x"], y, a, b, s["idx"], scale).float()
            try:
                got = lora_bgmv(s["x"], y.clone(), a, b, s["idx"], scale).float()
            except Exception as e:
                return f"lora_bgmv failed: {type(e).__name__}: {str(e)[:300]}"
            err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
            if not err <= AGREE_TOL[self.dtype]:
                return f"lora_bgmv disagrees with lora_bmm (max error {err:.3g} of the output's scale)"
        return None

    def _bytes(self, method, batch, tokens, distinct, r):
        d, outs, es = self.p.d, self.p.outs, self.es
        act = sum(batch * tokens * (d + 2 * o) for o in outs) * es  # x read, y read + written
        if method.startswith("pedro"):
            return sum(batch * tokens * 2 * o + batch * o for o in outs) * es
        adapters = 1 if method == "lora_single" else distinct
        return act + adapters * sum(r * (d + o) for o in outs) * es

    def rows(self, progress=None, deadline: Optional[float] = None) -> List[dict]:
        """deadline (time.time()): no new configuration starts after it."""
        out, configs = [], []
        plan = [(phase, b, k) for phase in ("decode", "prefill") for b in self.p.batches
                for k in distinct_counts(b)]
        if self.bgmv_skip:
            self.messages.append(f"kernel level: lora_bgmv skipped: {self.bgmv_skip}")
        self.floor.measure()
        if plan:
            self._warm_up(*plan[0])
        for done, (phase, batch, distinct) in enumerate(plan):
            if deadline is not None and time.time() > deadline:
                self.messages.append(f"kernel level: stopped at the time limit after {done} of "
                                     f"{len(plan)} configurations")
                break
            tokens = 1 if phase == "decode" else self.p.prompt_len
            sets = self._inputs(batch, tokens, distinct)
            measured, timed = {}, []
            for r in (None, *self.p.ranks):
                fns = self._fns(phase, sets, r)
                bad_bgmv = self._bgmv_disagreement(sets, r) if "lora_bgmv" in fns else None
                for method, (total, adapter_only) in fns.items():
                    if r is not None and not method.startswith("lora"):
                        continue  # base and PEDRO do not depend on LoRA's rank
                    rank = r if r is not None else (self.p.pedro_r if method.startswith("pedro") else 0)
                    row = dict(level="kernel", phase=phase, method=method.replace("_fused", ""),
                               variant="fused" if method == "pedro_fused" else None,
                               batch_size=batch, distinct_adapters=distinct, rank=rank,
                               tokens=batch * tokens)
                    if method == "lora_bgmv" and bad_bgmv:
                        row.update(median_ms=None, adapter_ms=None, refused=bad_bgmv)
                        self.messages.append(f"kernel {phase} B={batch} distinct={distinct} "
                                             f"r={r}: REFUSED {bad_bgmv}")
                    else:
                        timed.append((row, method, total, adapter_only))
                    measured[(method, r)] = row
                    out.append(row)
            self._time_interleaved(timed)
            if progress is not None:
                progress.update(len(measured))
            configs.append(measured)
        self.floor.measure()
        for row in out:
            self._refuse(row)
        for measured in configs:
            self._ratios(measured)
        return out

    def _warm_up(self, phase, batch, distinct):
        """One untimed pass over the first configuration's methods: the first figures of a run
        otherwise carry its start-up (allocator growth, first-call library set-up), and the bare
        model's, timed first, read up to 1.7x slow."""
        sets = self._inputs(batch, 1 if phase == "decode" else self.p.prompt_len, distinct)
        for r in (None, *self.p.ranks):
            for total, adapter_only in self._fns(phase, sets, r).values():
                for fn in (total, adapter_only):
                    if fn is not None:
                        measure(fn, self.device, self.p.warmup, self.p.repeats,
                                budget_ms=self.p.measure_budget_ms)

    def _time_interleaved(self, timed):
        """Times one configuration's methods (total and adapter part) in KERNEL_ROUNDS
        interleaved rounds. A method that fails (at its first call, or while it is warmed up,
        captured or timed) gets an error row; the others are still timed."""
        graph_ok = self.cuda_graph and self.device.type == "cuda"
        fns, no_graph = {}, set()  # keys (index in timed, "total" / "adapter")
        for k, (row, method, total, adapter_only) in enumerate(timed):
            if self._fails(row, method, lambda: [fn(0) for fn in (total, adapter_only) if fn]):
                continue
            for part, fn in (("total", total), ("adapter", adapter_only)):
                if fn is not None:
                    fns[(k, part)] = fn
                    if method == "lora_peft":  # it syncs: never captured in a graph
                        no_graph.add((k, part))
        timed_together = functools.partial(
            measure_interleaved, device=self.device, warmup=self.p.warmup,
            repeats=self.p.repeats, rounds=KERNEL_ROUNDS, cuda_graph=graph_ok,
            budget_ms=self.p.measure_budget_ms, no_graph=no_graph)
        try:
            stats = timed_together(fns)
        except Exception:  # someone failed later: time each method on its own, keep the rest
            stats = {}
            for k, (row, method, total, adapter_only) in enumerate(timed):
                mine = {key: fn for key, fn in fns.items() if key[0] == k}
                if mine:
                    self._fails(row, method, lambda: stats.update(timed_together(mine)))
        for k, (row, method, total, adapter_only) in enumerate(timed):
            if (k, "total") in stats:
                self._fill(row, method, graph_ok and method != "lora_peft", stats[(k, "total")],
                           stats.get((k, "adapter")))

    def _fails(self, row, method, work) -> bool:
        """Runs work(); on an exception records it as the row's error (one method's failure must
        not end the run) and returns True."""
        try:
            work()
            return False
        except Exception as e:
            row.update(median_ms=None, adapter_ms=None,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
            self.messages.append(f"kernel {row['phase']} B={row['batch_size']} {method}: "
                                 f"ERROR {row['error']}")
            return True

    def _fill(self, row, method, graph, t: Stats, a: Optional[Stats]):
        row.update(mode="cuda_graph" if graph else "eager", cuda_graph=graph,
                   **_stats_fields(t, ""), **(_stats_fields(a, "adapter_") if a else {}))
        if method != "base" and row.get("adapter_ms"):
            nbytes = self._bytes(method, row["batch_size"], row["tokens"] // row["batch_size"],
                                 row["distinct_adapters"], row["rank"])
            row["adapter_gbs"] = nbytes / (row["adapter_ms"] * 1e-3) / 1e9

    def _refuse(self, row):
        """The layer reads its base weights at least once; the adapter part must be a time.
        Judged on the fastest repeat: one impossible repeat means the timing is broken."""
        checks = (("median_ms", "minimum_ms", self.floor.ms, "the layer's fastest repeat"),
                  ("adapter_ms", "adapter_minimum_ms", 0.0, "the adapter's fastest repeat"))
        for key, fastest, floor, what in checks:
            if row.get(key) is None:
                continue
            reason = refusal(row.get(fastest, row[key]), floor, what)
            if reason:
                row["refused"] = "; ".join(filter(None, (row.get("refused"), reason)))
                row[key] = None
                if key == "adapter_ms":
                    row.pop("adapter_gbs", None)
                self.messages.append(f"kernel {row['phase']} B={row['batch_size']} "
                                     f"{row['method']} r={row['rank']}: REFUSED {reason}")

    @staticmethod
    def _ratios(measured):
        base = measured[("base", None)].get("median_ms")
        for (method, r), row in measured.items():
            if not method.startswith("pedro") or not row.get("median_ms"):
                continue
            row["ratio_vs"] = {f"{m}_r{rr}": other["median_ms"] / row["median_ms"]
                               for (m, rr), other in measured.items()
                               if m.startswith("lora") and other.get("median_ms")}
            if base:
                row["overhead_vs_base"] = row["median_ms"] / base - 1

    def count(self) -> int:
        n = 0
        lora = len(LORA_METHODS) - (1 if self.bgmv_skip else 0)
        for phase in ("decode", "prefill"):
            methods = 2 + (1 if phase == "prefill" else 0) + lora * len(self.p.ranks)
            n += sum(len(distinct_counts(b)) for b in self.p.batches) * methods
        return n

    def modulate_bandwidth(self) -> dict:
        """modulate alone on a large input against the measured copy bandwidth."""
        b, t, dd = max(self.p.batches), self.p.prompt_len, max(self.p.outs)
        x = torch.randn(b, t, dd, device=self.device).to(self.dtype)
        v = torch.randn(b, dd, device=self.device).to(self.dtype)
        ms = measure(lambda i: pedro_ext.modulate(x, v), self.device, self.p.warmup,
                     self.p.repeats).median
        gbs = (2 * x.numel() + v.numel()) * self.es / (ms * 1e-3) / 1e9
        copy = copy_bandwidth_gbs(x.numel(), self.dtype, self.device, self.p.warmup, self.p.repeats)
        # an out-of-place op also pays for its fresh output buffer: clone() is that baseline
        clone_ms = measure(lambda i: x.clone(), self.device, self.p.warmup, self.p.repeats).median
        clone = 2 * x.numel() * self.es / (clone_ms * 1e-3) / 1e9
        return dict(shape=[b, t, dd], modulate_ms=ms, modulate_gbs=gbs, copy_gbs=copy,
                    fraction_of_copy=gbs / copy, clone_gbs=clone, fraction_of_clone=gbs / clone)


def _stats_fields(st: Stats, prefix: str) -> dict:
    """median_ms, iqr_ms, q1_ms, q3_ms, minimum_ms, repeats (with a prefix such as "adapter_")."""
    return {prefix + "ms" if prefix else "median_ms": st.median,
            f"{prefix}iqr_ms": st.iqr, f"{prefix}q1_ms": st.q1, f"{prefix}q3_ms": st.q3,
            f"{prefix}minimum_ms": st.minimum, f"{prefix}repeats": st.n}
