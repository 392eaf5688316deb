"""Checks that keep impossible or doubtful figures out of the results.

Refusals (the figure is replaced by None and the reason is printed instead of a number):
- not positive, or below MIN_MS (no call launched from Python completes in under a microsecond:
  such a figure is a clock or arithmetic artefact);
- faster than reading the weights the call must read once (WeightFloor): weight bytes /
  (READ_OVER_COPY x the best copy bandwidth measured in the same run, before and after the
  timed work, by a copy whose source and destination together are as large as those weights,
  so that weights that sit in a cache are compared with a copy that does too, and load on a
  shared machine, which only slows a copy, cannot lower the bar). A copy's bandwidth counts the bytes read and written; a read-only
  stream can beat it (on CPUs a copy also pays for write-allocate), hence the factor 2 of
  margin: a figure below the floor is impossible, not just fast.

Flags (the figure stays, marked, with the reason):
- "noisy": IQR above NOISY_IQR of the median (of the total or of the adapter part);
- "vs batch": a method's time against its own neighbours in batch size: a larger batch more
  than JUMP times faster, or more than JUMP times slower than linear growth predicts; the row
  that disagrees with both neighbours (or with its only one, whose other neighbour agrees) is
  the one flagged;
- "rounds disagree": a model-level figure whose interleaved rounds ran at different speeds (the
  slowest round's median more than ROUND_SPREAD times the fastest's): the pooled median and
  the ratio to base then mix two states of the machine, and the round medians are the data;
- "vs base": an adapted method more than FASTER_THAN_BASE times faster than the base model in
  the same configuration (it does the base model's work and more); when most adapted methods
  are, the base row is flagged instead.
"""
import math
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from .timing import copy_bandwidth_gbs

MIN_MS = 1e-3
READ_OVER_COPY = 2.0
NOISY_IQR = 0.5
JUMP = 3.0
FASTER_THAN_BASE = 1.3
ROUND_SPREAD = 1.25
MAX_COPY_BYTES = 2 ** 30  # larger weight sets are compared with a 1 GiB working set (past any cache)


def weight_floor_ms(weight_bytes: int, copy_gbs: Optional[float]) -> float:
    if not copy_gbs or copy_gbs <= 0:
        return 0.0
    return weight_bytes / (READ_OVER_COPY * copy_gbs * 1e9) * 1e3


class WeightFloor:
    """The least time a call that reads `weight_bytes` of weights can take on this machine;
    call measure() before and after the timed work."""

    def __init__(self, weight_bytes: int, dtype: torch.dtype, device: torch.device):
        self.weight_bytes, self.dtype, self.device = weight_bytes, dtype, device
        self.samples_gbs: List[float] = []

    def measure(self) -> None:
        # source and destination together as large as the weights: the same working set
        es = torch.empty(0, dtype=self.dtype).element_size()
        numel = max(1024, min(self.weight_bytes, MAX_COPY_BYTES) // (2 * es))
        self.samples_gbs.append(copy_bandwidth_gbs(numel, self.dtype, self.device, 2, 10, best=True))

    @property
    def copy_gbs(self) -> Optional[float]:
        return max(self.samples_gbs) if self.samples_gbs else None

    @property
    def ms(self) -> float:
        return weight_floor_ms(self.weight_bytes, self.copy_gbs)

    def to_dict(self) -> dict:
        return dict(weight_bytes=self.weight_bytes, copy_gbs_samples=self.samples_gbs,
                    copy_gbs=self.copy_gbs, floor_ms=self.ms, read_over_copy=READ_OVER_COPY)


def refusal(value_ms: Optional[float], floor_ms: float = 0.0, what: str = "time") -> Optional[str]:
    """None when value_ms is a possible figure, else why it is refused."""
    if value_ms is None or not math.isfinite(value_ms):
        return f"{what} was not measured ({value_ms})"
    if value_ms <= 0:
        return f"{what} of {value_ms:.3g} ms is not positive"
    if value_ms < MIN_MS:
        return f"{what} of {value_ms:.3g} ms is below {MIN_MS} ms, no call can be that fast"
    if value_ms < floor_ms:
        return (f"{what} of {value_ms:.3g} ms is faster than reading the weights once "
                f"({floor_ms:.3g} ms at {READ_OVER_COPY:g}x the best copy bandwidth this run "
                "measured on a buffer of the weights' size)")
    return None


def _distinct_kind(r: dict) -> str:
    if r["distinct_adapters"] == r["batch_size"]:
        return "all"
    return "one" if r["distinct_adapters"] == 1 else "some"


def _series_key(r: dict):
    return (r["level"], r["phase"], r["method"], r.get("variant"), r["rank"], _distinct_kind(r))


def _config_key(r: dict):
    return (r["level"], r["phase"], r.get("mode"), r["batch_size"], r["distinct_adapters"])


def _plausible(b1, t1, b2, t2) -> bool:
    """b1 < b2: the larger batch neither much faster nor much slower than linear growth."""
    return t2 >= t1 / JUMP and t2 <= t1 * (b2 / b1) * JUMP


def _flag_batch_series(members: List[dict]) -> None:
    members.sort(key=lambda r: r["batch_size"])
    ok = [_plausible(a["batch_size"], a["median_ms"], b["batch_size"], b["median_ms"])
          for a, b in zip(members, members[1:])]  # ok[j]: members j and j + 1 agree
    for i, r in enumerate(members):
        pairs = [j for j in (i - 1, i) if 0 <= j < len(ok)]
        bad = [j for j in pairs if not ok[j]]
        if not bad:
            continue
        if len(pairs) == 2 and len(bad) == 2:
            r["flags"].append(f"vs batch: {r['median_ms']:.3g} ms at B={r['batch_size']} "
                              "disagrees with both neighbouring batch sizes")
        elif len(pairs) == 1:  # an end of the series: the outlier unless its neighbour is
            j = pairs[0]
            neighbour_other = j - 1 if i == j + 1 else j + 1
            if not 0 <= neighbour_other < len(ok) or ok[neighbour_other]:
                nb = members[j] if i == j + 1 else members[j + 1]
                r["flags"].append(f"vs batch: {r['median_ms']:.3g} ms at B={r['batch_size']} "
                                  f"against {nb['median_ms']:.3g} ms at B={nb['batch_size']}")


def rounds_disagree(r: dict) -> Optional[str]:
    """The flag of a row whose rounds ran at different speeds, else None."""
    rounds = [m for m in r.get("round_medians_ms") or () if m is not None]
    if len(rounds) < 2 or min(rounds) <= 0 or max(rounds) <= ROUND_SPREAD * min(rounds):
        return None
    slow = rounds.index(max(rounds)) + 1
    return (f"rounds disagree: round medians {min(rounds):.3g}-{max(rounds):.3g} ms (slowest: "
            f"round {slow} of {len(rounds)}); the pooled figures mix the rounds")


def flag_rows(rows: List[dict]) -> None:
    """Adds `flags` (a list of reasons, empty when none) to every row, in place."""
    for r in rows:
        r["flags"] = list(r.get("warnings") or [])  # what the measurement itself noticed
        for med_key, iqr_key, what in (("median_ms", "iqr_ms", ""),
                                       ("adapter_ms", "adapter_iqr_ms", " (adapter part)")):
            med, iqr = r.get(med_key), r.get(iqr_key)
            if med and iqr is not None and iqr > NOISY_IQR * med:
                r["flags"].append(f"noisy{what}: IQR {100 * iqr / med:.0f}% of the median")
        reason = rounds_disagree(r)
        if reason:
            r["flags"].append(reason)
    series: Dict[tuple, List[dict]] = defaultdict(list)
    configs: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r.get("median_ms"):
            series[_series_key(r)].append(r)
            configs[_config_key(r)].append(r)
    for members in series.values():
        _flag_batch_series(members)
    for members in configs.values():
        base = next((r for r in members if r["method"] == "base"), None)
        adapted = [r for r in members if r["method"] != "base"]
        if base is None or not adapted:
            continue
        fast = [r for r in adapted if r["median_ms"] * FASTER_THAN_BASE < base["median_ms"]]
        if len(fast) * 2 > len(adapted):
            base["flags"].append(f"vs base: slower than {len(fast)} of {len(adapted)} adapted "
                                 "methods, which do its work and more")
        else:
            for r in fast:
                r["flags"].append(f"vs base: {base['median_ms'] / r['median_ms']:.2f}x faster "
                                  "than the base model, which it cannot be")
