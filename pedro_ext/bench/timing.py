"""Timing with its spread.

- `measure`: a callable timed over repeats after warm-up (CUDA events on a GPU, optionally
  CUDA-graph replays; perf_counter on the CPU). The callable gets the repeat index so it can
  rotate its inputs. Slow callables get fewer repeats (a time budget per measurement).
  `measure_interleaved` times several callables that way in interleaved rounds.
- `StepClock`: a StoppingCriteria that Hugging Face `generate` calls once per generated token,
  right after the token is chosen; it timestamps each call, so the intervals are the time to
  the first token (prefill) and the time of every decoding step, measured inside the real
  generate loop of every method alike.
- `Stats`: median and quartiles of a list of samples; every figure of the benchmark is one.
- `round_order`: the order in which interleaved rounds run the methods (a balanced design).
"""
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Collection, Dict, Hashable, List, Sequence, TypeVar

import torch
from transformers import StoppingCriteria

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Stats:
    median: float
    q1: float
    q3: float
    n: int
    minimum: float
    maximum: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise ValueError("Stats.of: no samples")
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1, s[0], s[0])
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q1, q3, len(s), s[0], s[-1])

    def to_dict(self) -> dict:
        return dict(asdict(self), iqr=self.iqr)


def measure(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int,
            cuda_graph: bool = False, budget_ms: float = 2000.0, min_repeats: int = 5) -> Stats:
    """Stats in ms of fn over at most `repeats` calls, fewer when they would take longer than
    budget_ms in all (never fewer than min_repeats)."""
    return measure_interleaved({None: fn}, device, warmup, repeats, 1, cuda_graph, budget_ms,
                               min_repeats)[None]


def measure_interleaved(fns: Dict[K, Callable[[int], object]], device: torch.device, warmup: int,
                        repeats: int, rounds: int, cuda_graph: bool = False,
                        budget_ms: float = 2000.0, min_repeats: int = 5,
                        no_graph: Collection[K] = ()) -> Dict[K, Stats]:
    """measure() for several callables at once, their repeats split into `rounds` interleaved
    rounds (in round_order), so that drift of the machine during the measurement (clock,
    cache and memory state, other load) falls on all of them alike instead of on whichever
    ran last. Each callable is warmed up (and its CUDA graphs captured, except for the keys in
    no_graph) before any is timed."""
    timers = {key: _Timer(fn, device, warmup, cuda_graph and key not in no_graph, repeats)
              for key, fn in fns.items()}
    wanted = {key: t.repeats(repeats, budget_ms, min_repeats) for key, t in timers.items()}
    samples: Dict[K, List[float]] = {key: [] for key in fns}
    keys = list(fns)
    rounds = max(1, rounds)
    for rnd in range(rounds):
        for key in round_order(keys, rnd):
            n = -(-wanted[key] * (rnd + 1) // rounds) - len(samples[key])  # even split
            for _ in range(n):
                samples[key].append(timers[key].sample(len(samples[key])))
    return {key: Stats.of(samples[key]) for key in keys}


class _Timer:
    """One callable, warmed up: `sample(i)` times one call of it in ms (CUDA events on a GPU,
    optionally a CUDA-graph replay; perf_counter on the CPU)."""

    def __init__(self, fn: Callable[[int], object], device: torch.device, warmup: int,
                 cuda_graph: bool, repeats: int):
        self.cuda = device.type == "cuda"
        self.run = fn
        self.per_call_ms = self._warm_up(fn, warmup) if warmup else None
        if self.cuda and cuda_graph:
            # one graph per rotation slot, so replays still rotate their inputs
            graphs = []
            for i in range(min(repeats, 3)):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(i)
                graphs.append(g)
            self.run = lambda i: graphs[i % len(graphs)].replay()

    def _warm_up(self, fn, warmup) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for i in range(warmup):
                fn(i)
            return (time.perf_counter() - t0) * 1e3 / warmup
        stream = torch.cuda.Stream()  # (graph capture needs a side stream's warm-up)
        stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for i in range(warmup):
                fn(i)
            end.record()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return start.elapsed_time(end) / warmup

    def repeats(self, repeats: int, budget_ms: float, min_repeats: int) -> int:
        if not self.per_call_ms or self.per_call_ms <= 0:
            return repeats
        return max(min(repeats, min_repeats), min(repeats, int(budget_ms / self.per_call_ms)))

    def sample(self, i: int) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            self.run(i)
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.run(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def copy_bandwidth_gbs(numel: int, dtype: torch.dtype, device: torch.device, warmup: int,
                       repeats: int, best: bool = False) -> float:
    """The machine's measured copy bandwidth (bytes read + bytes written per second, in GB/s)
    for a tensor of numel elements: from the median copy, or with best=True the fastest."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    st = measure(lambda i: dst.copy_(src), device, warmup, repeats)
    ms = st.minimum if best else st.median
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


class StepClock(StoppingCriteria):
    """Pass in `stopping_criteria=StoppingCriteriaList([clock])`; call `start()` right before
    generate and `intervals_ms()` after it: [time to first token, step 1, step 2, ...].

    On a GPU the stamps are CUDA events on the current stream (no added host sync), so the
    intervals are the GPU timeline between consecutive tokens, idle gaps while the host
    launches work included; `start()` synchronises first so the first interval starts when
    generate is called."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._stamps: List = []
        self._never = {}

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._stamps = [self._now()]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self._stamps.append(self._now())
        key = (input_ids.shape[0], input_ids.device)
        if key not in self._never:
            self._never[key] = torch.zeros(key[0], dtype=torch.bool, device=key[1])
        return self._never[key]

    def intervals_ms(self) -> List[float]:
        s = self._stamps
        if self.cuda:
            s[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(s, s[1:])]
        return [(b - a) * 1e3 for a, b in zip(s, s[1:])]


def round_order(items: Sequence[T], rnd: int) -> List[T]:
    """The order of round `rnd` in a Williams design (a balanced Latin square): over every
    n rounds (2n for an odd number n of items) each item runs in each position equally often
    and directly after each other item equally often, so neither a position in the round nor
    the method that ran just before (a warm or evicted cache, a throttled core) favours one
    method. Plain cyclic rotation balances positions only: there each method runs right
    after the same neighbour in n - 1 of n rounds. A number of rounds that is not a multiple
    of the design's length balances only approximately."""
    n = len(items)
    if n <= 1:
        return list(items)
    first = [0]
    for j in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    rows = n if n % 2 == 0 else 2 * n
    row = rnd % rows
    order = [(i + row % n) % n for i in first]
    if row >= n:  # odd n: the second half reverses the first
        order.reverse()
    return [items[i] for i in order]
