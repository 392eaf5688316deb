"""Smoke test of `python -m pedro_ext.bench --quick` on the tiny preset: schema and sanity."""
import json
import subprocess
import sys

METHODS = {"base", "pedro", "pedro_reference", "lora_bmm", "lora_peft", "lora_single"}


def test_bench_quick_tiny_writes_json_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pedro_ext.bench", "--quick", "--preset", "tiny",
                          "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernel level, decode" in out.stdout and "model level, decode" in out.stdout
    result = json.load(open(tmp_path / "bench.json"))
    assert {"torch", "device_name", "cpu_count"} <= set(result["machine"])
    rows = result["rows"]
    assert rows
    for r in rows:
        assert r["level"] in ("kernel", "model") and r["phase"] in ("decode", "prefill")
        assert r["method"] in METHODS
        for key in ("batch_size", "distinct_adapters", "rank", "median_ms"):
            assert key in r, key
        assert r["median_ms"] > 0
        if r["level"] == "model":
            assert r["tokens_per_s"] > 0
    seen = {(r["level"], r["method"]) for r in rows}
    assert {m for lvl, m in seen if lvl == "kernel"} == METHODS - {"pedro_reference"}
    assert {m for lvl, m in seen if lvl == "model"} == METHODS - {"lora_single"}
    kernel_pedro = [r for r in rows if r["level"] == "kernel" and r["method"] == "pedro"
                    and r["phase"] == "decode"]
    assert all(r["ratio_vs"] and all(v > 0 for v in r["ratio_vs"].values()) for r in kernel_pedro)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
