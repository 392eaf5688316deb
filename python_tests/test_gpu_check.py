"""bench/gpu_check.sh's compute-sanitizer subset selects what its comment promises. Collection
needs no GPU, so this runs on the CPU: a -k expression that names parameter ids pytest does not
produce (dtype0 ...) once selected 2 of 213 tests without anyone noticing."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# one test per promised path: (substring of the node id, what it covers)
REQUIRED = [
    ("test_generate_cuda[5x3x70x40x33-float16]", "plain generate expand kernel, r > 32"),
    ("test_modulate_cuda[misaligned_x-3x300x37-float16]", "scalar head / tail, misaligned rows"),
    ("test_modulate_cuda[odd_row_stride-", "rows misaligned by their stride only"),
    ("test_modulate_cuda[strided_x-", "strided rows"),
    ("test_modulate_cuda[uneven_rows-", "unevenly strided rows (rows_view copy)"),
    ("test_modulate_cuda[sliced-", "sliced vectors"),
    ("test_modulate_inplace_cuda[padded-float16]", "modulate_'s 16-byte path"),
    ("test_generate_and_modulate_cuda_row_layouts_with_split_rows", "fused prefill, split rows"),
    ("test_vector_grads_cuda_16_byte_path_and_row_splits", "vector-gradient reduction"),
    ("test_rational_backward_cuda_half", "rational_backward"),
    ("test_cuda_invalid_ids_follow_the_rule", "invalid ids"),
    ("test_generate_and_modulate_cuda_invalid_seq_ids_with_split_rows", "invalid seq ids, split"),
]


def _subset_args():
    """The SUBSET array of gpu_check.sh, evaluated by bash from the script's own lines."""
    lines = (ROOT / "bench" / "gpu_check.sh").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("F16="))
    end = next(i for i, l in enumerate(lines) if l.startswith("SUBSET=("))
    script = "\n".join(lines[start:end + 1]) + '\nprintf "%s\\0" "${SUBSET[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_sanitizer_subset_is_small_covering_and_cheap_first():
    args = _subset_args()
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [l for l in out.stdout.splitlines() if "::" in l]
    assert 20 <= len(ids) <= 60, (len(ids), ids)
    for needle, what in REQUIRED:
        assert any(needle in i for i in ids), f"the subset misses {what} ({needle})"
    modulate = [i for i in ids if "::test_modulate_cuda[" in i]
    assert modulate and all(i.endswith("-float16]") for i in modulate), "one half dtype"
    assert "deterministic" in ids[-1], "the heavy determinism test must come last"
