"""The benchmark's own machinery: spread statistics, the per-step clock, the sanity checks that
refuse impossible figures, outlier flags, and the README generator (every figure from the json)."""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import pedro_ext
from pedro_ext.bench import PRESETS
from pedro_ext.bench.report import _targets, console_report, markdown, markers, ms
from pedro_ext.bench.sanity import MIN_MS, flag_rows, refusal, weight_floor_ms
from pedro_ext.bench.timing import Stats, StepClock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ms_format_has_no_exponents():
    assert [ms(v) for v in (1234.5, 45.67, 3.456, 0.01234, None)] == ["1234", "45.7", "3.46",
                                                                   "0.0123", "-"]


def test_stats_median_and_quartiles():
    st = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st.median, st.q1, st.q3, st.n, st.iqr) == (3.0, 2.0, 4.0, 5, 2.0)
    assert (st.minimum, st.maximum) == (1.0, 5.0)
    assert Stats.of([7.0]).iqr == 0.0
    with pytest.raises(ValueError, match="no samples"):
        Stats.of([])


def test_step_clock_pairs_consecutive_calls():
    clock = StepClock(torch.device("cpu"))
    ids = torch.zeros(3, 4, dtype=torch.long)
    clock.start()
    for pause in (0.02, 0.005, 0.04):
        time.sleep(pause)
        done = clock(ids, None)
        assert done.dtype == torch.bool and done.shape == (3,) and not done.any()
    got = clock.intervals_ms()
    assert len(got) == 3
    assert got[0] >= 20 and got[1] >= 5 and got[2] >= 40


def test_weight_floor_takes_the_best_copy_at_the_weights_size():
    from pedro_ext.bench.sanity import WeightFloor
    floor = WeightFloor(4 * 2 ** 20, torch.float32, torch.device("cpu"))
    floor.measure()
    floor.measure()
    assert len(floor.samples_gbs) == 2 and floor.copy_gbs == max(floor.samples_gbs) > 0
    assert floor.ms == pytest.approx(4 * 2 ** 20 / (2 * floor.copy_gbs * 1e9) * 1e3)


def test_refusal_of_impossible_figures():
    floor = weight_floor_ms(2 * 10 ** 9, 100.0)  # 2 GB at twice 100 GB/s: 10 ms
    assert floor == pytest.approx(10.0)
    assert refusal(12.0, floor) is None
    assert "faster than reading the weights" in refusal(9.0, floor)
    assert "not positive" in refusal(-1.0)
    assert "not positive" in refusal(0.0)
    assert "below" in refusal(MIN_MS / 2)
    assert "not measured" in refusal(float("nan"))
    assert weight_floor_ms(10 ** 9, None) == 0.0


def _row(method, batch, ms, iqr=0.0, level="kernel", distinct=None):
    return dict(level=level, phase="decode", method=method, batch_size=batch,
                distinct_adapters=batch if distinct is None else distinct, rank=8,
                median_ms=ms, iqr_ms=iqr, mode="eager")


def test_flags_point_at_the_outlier_not_its_neighbours():
    series = [_row("lora_bmm", b, t) for b, t in ((1, 0.02), (8, 40.0), (32, 0.03), (128, 0.05))]
    flag_rows(series)
    assert [bool(r["flags"]) for r in series] == [False, True, False, False]
    assert "vs batch" in series[1]["flags"][0]
    end = [_row("pedro", b, t) for b, t in ((1, 0.02), (8, 0.021), (32, 9.0))]
    flag_rows(end)
    assert [bool(r["flags"]) for r in end] == [False, False, True]
    linear = [_row("lora_peft", b, 0.01 * b) for b in (1, 8, 32, 128)]  # linear growth: fine
    flag_rows(linear)
    assert not any(r["flags"] for r in linear)


def test_flags_noisy_rows_and_faster_than_base():
    rows = [_row("base", 8, 10.0), _row("pedro", 8, 5.0), _row("lora_bmm", 8, 11.0, iqr=8.0),
            _row("lora_peft", 8, 12.0)]
    flag_rows(rows)
    assert not rows[0]["flags"]
    assert "faster than the base model" in rows[1]["flags"][0]
    assert "noisy" in rows[2]["flags"][0]
    # when most adapted methods beat the base model, the base figure is the doubtful one
    rows = [_row("base", 8, 30.0), _row("pedro", 8, 10.0), _row("lora_bmm", 8, 11.0)]
    flag_rows(rows)
    assert "slower than 2 of 2" in rows[0]["flags"][0]
    assert not rows[1]["flags"] and not rows[2]["flags"]


def test_flags_a_round_that_ran_at_another_speed_and_the_verdict_says_so():
    """The first GPU run's bare model had one round of three at about 5x the others' step
    time: its pooled median and PEDRO's ratio to it mixed two states of the machine."""
    def model_row(method, rounds):
        return dict(_row(method, 8, statistics.median(rounds), level="model"),
                    round_medians_ms=rounds, tokens_per_s_vs_base=0.995)
    steady = [model_row("base", [8.0, 8.2, 8.1]), model_row("pedro", [8.1, 8.3, 8.2])]
    flag_rows(steady)
    assert not any(r["flags"] for r in steady)
    assert "B=8: 0.995x: met." in "".join(_targets(steady))
    slow = [model_row("base", [8.0, 60.0, 8.1]), model_row("pedro", [8.1, 8.3, 8.2])]
    flag_rows(slow)
    assert slow[0]["flags"] == ["rounds disagree: round medians 8-60 ms (slowest: round 2 of 3); "
                                "the pooled figures mix the rounds"]
    assert not slow[1]["flags"]
    verdict = "\n".join(_targets(slow))
    assert "B=8: 0.995x" in verdict and "met (not reliable: the rounds of base ran" in verdict
    # a single round, or rows without per-round figures (older json), are never flagged
    for rounds in ([8.0], None):
        row = dict(_row("base", 8, 8.0, level="model"), round_medians_ms=rounds)
        flag_rows([row])
        assert not row["flags"]


def test_model_bench_refuses_a_step_faster_than_reading_the_weights(monkeypatch):
    """End to end: with a copy bandwidth that makes reading the weights take longer than any
    step did, every figure is refused, printed as REFUSED, and None in the rows."""
    from pedro_ext.bench import sanity
    from pedro_ext.bench.model_bench import ModelBench
    monkeypatch.setattr(sanity, "copy_bandwidth_gbs", lambda *args, **kwargs: 1e-9)
    preset = PRESETS["tiny"].replace(model_batches=(2,), model_new_tokens=3)
    mb = ModelBench(preset, torch.device("cpu"), methods=("base", "pedro"))
    rows = mb.rows()
    assert mb.floor.ms > 1e6
    assert len(rows) == 4 and all(r["median_ms"] is None and "faster than reading" in r["refused"]
                                  for r in rows)
    assert all("tokens_per_s_vs_base" not in r for r in rows)
    assert sum("REFUSED" in m for m in mb.messages) == 4
    result = dict(machine=dict(device_name="cpu", device="cpu", cpu_count=2, torch="x"),
                  preset=preset.__dict__, rows=rows,
                  summary=dict(preset="tiny", dtype="float32", copy_gbs=1e-9, wall_s=1.0,
                               messages=mb.messages))
    flag_rows(rows)
    text = console_report(result)
    assert text.count("REFUSED") >= 4 and "faster than reading the weights" in text


def test_model_bench_warms_up_at_the_timed_length(monkeypatch):
    """The warm-up round grows every method's KV cache to the timed rounds' length, so the
    first timed round does not pay for the allocator's first reservations."""
    from pedro_ext.bench.model_bench import ModelBench
    preset = PRESETS["tiny"].replace(model_batches=(2,), model_new_tokens=4, model_rounds=2)
    mb = ModelBench(preset, torch.device("cpu"), methods=("base", "pedro"))
    asked = []
    generate = ModelBench._generate

    def recording(self, setup, batch, ids, mask, new):
        asked.append(new)
        return generate(self, setup, batch, ids, mask, new)
    monkeypatch.setattr(ModelBench, "_generate", recording)
    rows = mb.rows()
    assert asked == [4] * 2 * (1 + 2)  # two methods, a warm-up round and two timed rounds
    assert all(r["rounds"] == 2 for r in rows)


def test_time_limit_stops_new_configurations_and_says_so():
    from pedro_ext.bench.kernel_bench import KernelBench
    kb = KernelBench(PRESETS["tiny"], torch.device("cpu"))
    assert kb.rows(deadline=time.time() - 1) == []
    assert any("stopped at the time limit after 0 of" in m for m in kb.messages)


@pytest.mark.parametrize("results, name", [("cpu-2core", ""), ("cpu-2core-compiled", "compiled")])
def test_readme_benchmarks_section_is_generated_from_the_committed_json(results, name):
    path = os.path.join("bench", "results", results, "bench.json")
    with open(os.path.join(ROOT, path)) as f:
        result = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    begin, end = markers(name)
    assert begin in readme and end in readme
    section = readme.split(begin, 1)[1].split(end, 1)[0]
    assert section.strip() == markdown(result, path).strip(), (
        f"README's benchmark figures differ from {path}: run python -m pedro_ext.bench.report "
        f"--markdown {path} --readme README.md" + (f" --section {name}" if name else ""))
    # and every model-level figure of the json is in it
    for r in result["rows"]:
        if r["level"] == "model" and r.get("median_ms"):
            assert f"{ms(r['median_ms'])}, IQR {ms(r['iqr_ms'])}" in section, r


def test_compiled_scaling_ab_times_both_ways_of_scaling_beside_base(tmp_path):
    # in its own process: the bench sets torch's thread count and dynamo's limits
    subprocess.run([sys.executable, "-m", "bench.compiled_scaling_ab", "--preset", "tiny",
                    "--batches", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    with open(tmp_path / "scaling_ab.json") as f:
        result = json.load(f)
    decode = {r["method"]: r for r in result["rows"] if r["phase"] == "decode"}
    assert set(decode) == {"base", "pedro", "pedro_custom_ops"}
    assert all(r["median_ms"] > 0 for r in decode.values())
    assert result["paired"]["1"]["n"] == 1 and result["paired"]["1"]["median"] > 0


def test_prefill_adapters_pairs_each_round_beside_base(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.prefill_adapters", "--adapters", "2", "3",
                    "--rounds", "4", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    with open(tmp_path / "prefill_adapters.json") as f:
        rows = json.load(f)["rows"]
    assert [r["adapters"] for r in rows] == [2, 3]
    for r in rows:
        base, pedro = r["times_ms"]["base"], r["times_ms"]["pedro"]
        assert len(base) == len(pedro) == 4 and min(base + pedro) > 0
        deltas = sorted(p - b for p, b in zip(pedro, base))
        assert r["delta_ms"] == pytest.approx((deltas[1] + deltas[2]) / 2)


@pytest.mark.parametrize("args", [["--adapters", "0"], ["--rounds", "5"], ["--rounds", "2"]])
def test_prefill_adapters_refuses_counts_it_cannot_measure(args):
    from bench.prefill_adapters import main
    with pytest.raises(SystemExit):
        main(args)


def test_compiled_scaling_ab_pairs_rounds_and_skips_refused_figures():
    from bench.compiled_scaling_ab import CONTROL, paired
    runs = {"pedro": [[9.0, 1.0, 1.0, 3.0], [9.0, 2.0, 2.0]], CONTROL: [[9.0, 2.0, 2.0, 1.0],
                                                                      [9.0, 2.0, 2.0]]}
    rows = [dict(phase="decode", method=m, median_ms=1.0) for m in ("base", "pedro", CONTROL)]
    got = paired(runs, rows)
    assert got["rounds"] == [2.0, 1.0] and got["median"] == 1.5 and got["n"] == 2
    rows[1]["median_ms"] = None  # pedro's decode figure refused
    assert paired(runs, rows) == {}


@pytest.mark.parametrize("n", range(1, 8))
def test_round_order_balances_positions_and_predecessors(n):
    from collections import Counter
    from pedro_ext.bench.timing import round_order
    items = [f"m{i}" for i in range(n)]
    rows = n if n % 2 == 0 else 2 * n
    orders = [round_order(items, r) for r in range(rows)]
    assert all(sorted(o) == sorted(items) for o in orders)
    positions = Counter((o[i], i) for o in orders for i in range(n))
    assert len(positions) == n * n and len(set(positions.values())) == 1
    follows = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1
    assert round_order(items, rows + 3) == orders[3 % rows]  # the design repeats


def test_measure_interleaved_spreads_drift_over_every_callable(monkeypatch):
    """Three identical callables on a machine that slows down steadily (a simulated clock:
    each call takes 1 + 0.1 * (calls so far) ms): timed one after the other the last reads far
    slower; interleaved in a complete balanced design, each gets its repeats spread over the
    whole run and their medians agree."""
    import types
    from pedro_ext.bench import timing
    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def drifting(i):
        clock["calls"] += 1
        clock["now"] += (1 + 0.1 * clock["calls"]) * 1e-3

    sequential = [timing.measure(drifting, torch.device("cpu"), 0, 12).median for _ in range(3)]
    assert sequential[2] > 1.8 * sequential[0]  # the drift the interleaving has to cancel
    clock["calls"] = 0
    order = []
    fns = {k: (lambda i, k=k: order.append(k) or drifting(i)) for k in "abc"}
    stats = timing.measure_interleaved(fns, torch.device("cpu"), 0, 12, rounds=6)
    assert all(stats[k].n == 12 for k in "abc") and len(order) == 36
    assert all(order[6 * j:6 * j + 6].count(k) == 2 for j in range(6) for k in "abc"), \
        "each round times every callable a sixth of its repeats"
    medians = [stats[k].median for k in "abc"]
    assert max(medians) < 1.15 * min(medians)  # (sequential: 2.4x)


def test_kernel_bench_keeps_timing_the_others_when_one_method_fails_late():
    from pedro_ext.bench.kernel_bench import KernelBench
    kb = KernelBench(PRESETS["tiny"], torch.device("cpu"))
    calls = {"n": 0}

    def fails_on_second_call(i):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("out of memory")

    def row(method):
        return dict(level="kernel", phase="decode", method=method, batch_size=1,
                    distinct_adapters=1, rank=0, tokens=1)
    rows = [row("base"), row("lora_bmm"), row("pedro")]
    ok = lambda i: sum(range(100))  # noqa: E731
    kb._time_interleaved([(rows[0], "base", ok, None), (rows[1], "lora_bmm", fails_on_second_call, ok),
                          (rows[2], "pedro", ok, ok)])
    assert rows[0]["median_ms"] > 0 and rows[2]["median_ms"] > 0 and rows[2]["adapter_ms"] > 0
    assert rows[1]["median_ms"] is None and "out of memory" in rows[1]["error"]
    assert any("lora_bmm: ERROR RuntimeError: out of memory" in m for m in kb.messages)


def test_profile_table_keeps_the_ops_a_method_adds_and_the_largest_gaps():
    from pedro_ext.bench.op_profile import differing_ops, profile_table

    def prof(**ops):
        return {"steps": 4, "ops": {k: {"cpu_ms": t, "calls": c} for k, (t, c) in ops.items()}}
    base = prof(mm=(10.0, 9), mul=(1.0, 5), add=(0.5, 3), cat=(0.2, 1))
    pedro = prof(mm=(10.1, 9), mul=(0.7, 4), add=(0.5, 3), cat=(0.9, 1), modulate_=(0.001, 6))
    ops = differing_ops({"base": base, "pedro": pedro}, top=3)
    # the op PEDRO adds stays though it is the smallest gap; then the largest time gaps
    assert set(ops) == {"modulate_", "cat", "mul"} and ops[0] == "cat"
    text = profile_table({"base": base, "pedro": pedro}, {"pedro": "PEDRO"}, top=3)
    assert "| `modulate_` | - | 0.001 (6) |" in text
    assert "| `mul` | 1.000 (5) | 0.700 (4) |" in text
    assert text.splitlines()[-1] == "| all operators | 11.700 | 12.201 |"


def test_profile_table_device_total_counts_each_kernel_once():
    from pedro_ext.bench.op_profile import profile_table
    # an op's device_ms is the time of the kernels it launched; the total is every kernel once
    # (device_total_ms), not the ops' sum, which would miss kernels no op launched itself
    base = {"steps": 2, "device_total_ms": 5.0,
            "ops": {"mm": {"cpu_ms": 1.0, "calls": 3, "device_ms": 4.0},
                    "cudaGraphLaunch": {"cpu_ms": 0.1, "calls": 1, "device_ms": 0.0}}}
    pedro = {"steps": 2, "device_total_ms": 5.5,
             "ops": {"mm": {"cpu_ms": 1.0, "calls": 3, "device_ms": 4.0},
                     "modulate_": {"cpu_ms": 0.2, "calls": 2, "device_ms": 0.5}}}
    text = profile_table({"base": base, "pedro": pedro}, {}, top=5)
    assert "| `modulate_` | - | 0.200 / 0.500 (2) |" in text
    assert text.splitlines()[-1] == \
        "| all operators (device: every kernel once) | 1.100 / 5.000 | 1.200 / 5.500 |"


def test_report_header_names_the_cpu_loops_in_use():
    """A CPU figure depends on which clone of the kernels' loops ran: the header says it."""
    from pedro_ext.bench.report import _header
    from pedro_ext.bench.runner import machine_info
    summary = dict(preset="tiny", dtype="float32", copy_gbs=1.0)
    machine = machine_info(torch.device("cpu"))
    isa = pedro_ext.build_info()["cpu_kernel_isa"]
    assert f"pedro_ext CPU loops {isa};" in _header(dict(machine=machine, summary=summary))
    del machine["pedro_ext"]["cpu_kernel_isa"]  # a result written before it was recorded
    assert "CPU loops" not in _header(dict(machine=machine, summary=summary))


def test_cpu_isa_ab_pairs_the_trees_per_round():
    """bench/cpu_isa_ab.py: each figure's median and range over rounds per tree, and the ratio of
    the two trees' times taken within each round (not a ratio of medians); refused figures are
    left out and listed."""
    from bench.cpu_isa_ab import markdown, refusals, summarise
    fig = lambda us: {"k": {"pedro_ext_us": us, "torch_us": 1.0}}
    rounds = [{"a": {"figures": fig(a)}, "b": {"figures": fig(b)}}
              for a, b in ((2.0, 1.0), (9.0, 10.0), (3.0, 4.0))]
    row = summarise(["a", "b"], rounds)["k"]
    assert row["a pedro_ext_us"] == {"median": 3.0, "min": 2.0, "max": 9.0}
    # (the ratio of the medians would be 0.75)
    assert row["a / b time"] == {"median": 0.9, "min": 0.75, "max": 2.0, "rounds": 3,
                                 "rounds_slower": 1}
    text = markdown(dict(trees=["a", "b"], rounds=3, machine="m", isa={"a": "x", "b": "y"},
                         commits={"a": "c1", "b": "c2"}, table={"k": row}))
    assert ("| k | 3.00 (2.00-9.00) | 4.00 (1.00-10.00) | 0.90 (0.75-2.00) | 1 of 3 | "
            "1.00 / 1.00 |") in text and "(commit c1)" in text
    # a refused figure (None, with its reason) leaves its round out of the figure and the ratio
    rounds[0]["a"]["figures"]["k"]["pedro_ext_us"] = None
    rounds[0]["a"]["refused"] = {"k pedro_ext_us": "too fast"}
    row = summarise(["a", "b"], rounds)["k"]
    assert row["a pedro_ext_us"] == {"median": 6.0, "min": 3.0, "max": 9.0}
    assert row["a / b time"] == {"median": 0.825, "min": 0.75, "max": 0.9, "rounds": 2,
                                 "rounds_slower": 0}
    assert refusals(["a", "b"], rounds) == ["round 1, a: k pedro_ext_us: too fast"]
    for r in rounds:
        r["a"]["figures"]["k"]["pedro_ext_us"] = None
    table = summarise(["a", "b"], rounds)
    text = markdown(dict(trees=["a", "b"], rounds=3, machine="m", isa={"a": "x", "b": "y"},
                         commits={"a": "c1", "b": "c2"}, table=table,
                         refused=refusals(["a", "b"], rounds)))
    assert "| k | REFUSED | 4.00 (1.00-10.00) | REFUSED | 0 of 0 | 1.00 / 1.00 |" in text
    assert "- round 1, a: k pedro_ext_us: too fast" in text
