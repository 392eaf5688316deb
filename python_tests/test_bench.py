"""Smoke test of `python -m pedro_ext.bench --quick` on the tiny preset: schema and sanity."""
import json
import statistics
import subprocess
import sys

import pytest

from pedro_ext.bench.report import markdown, ms

KERNEL = {"base", "pedro", "lora_bmm", "lora_peft", "lora_single"}
MODEL = {"base", "pedro", "pedro_reference", "lora_bmm", "lora_peft"}  # lora_bgmv: GPU only


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    # one thread: on a loaded machine more threads wait for each other (see runner.py)
    out = subprocess.run([sys.executable, "-m", "pedro_ext.bench", "--quick", "--preset", "tiny",
                          "--device", "cpu", "--threads", "1", "--profile-ops",
                          "--out", str(out_dir)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(out_dir / "bench.json") as f:
        return out.stdout, json.load(f), out_dir


def _measured(r):
    """A figure is a positive number, or None with the reason it was refused / failed."""
    if r["median_ms"] is None:
        assert r.get("refused") or r.get("error"), r
        return False
    assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
    return True


def test_bench_quick_tiny_schema(quick_run):
    stdout, result, out_dir = quick_run
    for title in ("kernel level, decode", "model level, decode: time per output token",
                  "model level, prefill: time to first token"):
        assert title in stdout
    assert "lora_bgmv skipped" in stdout  # no GPU here: said, not silently dropped
    assert {"torch", "device_name", "cpu_count"} <= set(result["machine"])
    assert result["summary"]["copy_gbs"] > 0
    rows = result["rows"]
    for r in rows:
        assert r["level"] in ("kernel", "model") and r["phase"] in ("decode", "prefill")
        for key in ("batch_size", "distinct_adapters", "rank", "median_ms", "flags"):
            assert key in r, key
        _measured(r)
    assert {r["method"] for r in rows if r["level"] == "kernel"} == KERNEL
    assert {r["method"] for r in rows if r["level"] == "model"} == MODEL
    kernel_pedro = [r for r in rows if r["level"] == "kernel" and r["method"] == "pedro"
                    and r["phase"] == "decode" and r["median_ms"]]
    assert all(r["ratio_vs"] and all(v > 0 for v in r["ratio_vs"].values()) for r in kernel_pedro)
    assert (out_dir / "bench.png").stat().st_size > 10_000


def test_model_rows_are_per_step_with_spread(quick_run):
    _, result, _ = quick_run
    p = result["preset"]
    rows = [r for r in result["rows"] if r["level"] == "model"]
    for r in rows:
        if not _measured(r):
            continue
        if r["phase"] == "decode":
            # every decoding step of every timed round is a sample, TTFT one per round
            assert r["tpot_ms"]["n"] == p["model_rounds"] * (p["model_new_tokens"] - 1)
            assert r["median_ms"] == r["tpot_ms"]["median"]
            assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["median_ms"])
            assert r["prefill_ms"] == r["ttft_ms"]["median"]
            # one median per timed round, each within the pooled steps' range
            assert len(r["round_medians_ms"]) == p["model_rounds"]
            assert all(r["tpot_ms"]["minimum"] <= m <= r["tpot_ms"]["maximum"]
                       for m in r["round_medians_ms"])
        else:
            assert r["ttft_ms"]["n"] == p["model_rounds"] and r["median_ms"] == r["ttft_ms"]["median"]
            assert len(r["round_medians_ms"]) == p["model_rounds"]  # one prefill per round
            assert r["median_ms"] == pytest.approx(statistics.median(r["round_medians_ms"]))
            assert r["tokens_per_s"] == pytest.approx(
                r["batch_size"] * p["model_prompt_len"] * 1e3 / r["median_ms"])
    # each phase's ratio to base comes from that phase's own base row
    for r in rows:
        base = next(b for b in rows if b["method"] == "base" and b["phase"] == r["phase"]
                    and b["batch_size"] == r["batch_size"])
        if r.get("tokens_per_s_vs_base") is not None:
            assert r["tokens_per_s_vs_base"] == pytest.approx(base["median_ms"] / r["median_ms"])
            assert r["vs_base_rounds"]["n"] == p["model_rounds"]


def test_markdown_of_the_run_quotes_its_figures(quick_run):
    _, result, _ = quick_run
    text = markdown(result, "bench.json")
    for r in result["rows"]:
        if r["level"] == "model" and r["median_ms"]:
            assert f"{ms(r['median_ms'])}, IQR {ms(r['iqr_ms'])}" in text


def test_decode_profile_shows_what_each_step_runs(quick_run):
    """--profile-ops: per decoding step, PEDRO's fused path runs one act_mul_modulate per layer
    and one in-place modulate_ per layer for each of Q and V, and one multiplication fewer per
    layer than base (the MLP's product is fused); its vectors are not recomputed (no generate
    op: that runs at prefill only, which the profile leaves out); base and the reference ops
    run no pedro_ext op."""
    stdout, result, _ = quick_run
    p, mi = result["preset"], result["summary"]["model"]
    layers = mi["num_hidden_layers"]
    head_dim = mi["hidden_size"] // mi["num_attention_heads"]
    entries = layers * (mi["hidden_size"] + mi["num_key_value_heads"] * head_dim
                        + mi["intermediate_size"])
    decode = [r for r in result["rows"] if r["level"] == "model" and r["phase"] == "decode"]
    assert decode
    for r in decode:
        assert r["decode_ops"]["steps"] == p["model_new_tokens"] - 1
        ops = r["decode_ops"]["ops"]
        calls = {k: v["calls"] for k, v in ops.items()}
        assert all(v["cpu_ms"] >= 0 and v["calls"] > 0 for v in ops.values())
        base = next(b for b in decode if b["method"] == "base"
                    and b["batch_size"] == r["batch_size"])["decode_ops"]["ops"]
        if r["method"] == "pedro":
            assert calls["pedro_ext::act_mul_modulate"] == layers
            assert calls["pedro_ext::modulate_"] == 2 * layers
            assert calls["aten::mul"] == base["aten::mul"]["calls"] - layers
            assert not any(k.startswith("pedro_ext::generate") for k in ops)
            assert r["vector_bytes_per_step"] == r["batch_size"] * entries * 4
        elif r["method"] in ("base", "pedro_reference"):
            assert not any(k.startswith("pedro_ext::") for k in ops), sorted(ops)
    for b in p["model_batches"]:
        assert f"Decoding step by operator, B={b}" in stdout
    assert "`pedro_ext::act_mul_modulate` |" in markdown(result, "bench.json")
