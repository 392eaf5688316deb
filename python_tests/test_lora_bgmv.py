"""The benchmark's fused BGMV LoRA (Triton) against a float64 reference: on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because Triton reads it when the
kernels are defined), compiled on a GPU when one is present."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close, requires_cuda

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (rows per request T, requests B, d, r, out, N): non-power-of-2 ranks and widths, several
# split-K slices (d above one block), prefill rows (T > 1), a single row, no rows.
SHAPES = [(1, 5, 40, 3, 24, 4), (1, 1, 600, 8, 70, 3), (3, 4, 300, 16, 130, 6),
          (1, 6, 96, 64, 50, 8), (2, 0, 32, 8, 16, 2)]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def reference(x, y, a, b, ids, scale):
    """float64: y + scale * (x @ A[id]) @ B[id] per request, rows with id -1 unchanged."""
    out = y.double().clone()
    for i, k in enumerate(ids.tolist()):
        if k >= 0:
            out[i] += scale * (x[i].double() @ a[k].double()) @ b[k].double()
    return out


def check_against_reference(device: str, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    from pedro_ext.bench.lora_bgmv import lora_bgmv

    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for t, bsz, d, r, out, n in SHAPES:
            def rnd(*s, scale=1.0):
                return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
            x, y = rnd(bsz, t, d), rnd(bsz, t, out)
            a, b = rnd(n, d, r, scale=d ** -0.5), rnd(n, r, out, scale=0.5)
            ids = torch.randint(-1, n, (bsz,), generator=g)
            if bsz > 1:
                ids[0], ids[1] = -1, ids[-1].clamp(min=0)  # a base row and a repeated adapter
            ids = ids.to(device)
            expected = reference(x.cpu(), y.cpu(), a.cpu(), b.cpu(), ids.cpu(), 2.0)
            y_before = y.clone()
            got = lora_bgmv(x, y, a, b, ids, 2.0)
            assert got is y  # in place
            what = f"{dtype} T={t} B={bsz} d={d} r={r} out={out}"
            assert_close(got, expected, dtype, what, tol=TOL[dtype])
            base_rows = (ids == -1).cpu()
            assert torch.equal(got.cpu()[base_rows], y_before.cpu()[base_rows]), what
            again = lora_bgmv(x, y_before.clone(), a, b, ids, 2.0)
            assert torch.equal(again, got), f"{what}: not deterministic"


def check_op_registration(device: str):
    """Schema, fake kernel and AOT dispatch (opcheck), and one fullgraph torch.compile."""
    from pedro_ext.bench.lora_bgmv import lora_bgmv
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 40, generator=g), torch.randn(4, 24, generator=g)
    a, b = torch.randn(3, 40, 8, generator=g), torch.randn(3, 8, 24, generator=g)
    x, y, a, b = (t.to(device) for t in (x, y, a, b))
    ids = torch.tensor([0, -1, 2, 2], device=device)
    torch.library.opcheck(torch.ops.pedro_ext_bench.lora_bgmv_, (y, x, a, b, ids, 1, 0.5))
    compiled = torch.compile(lambda x, y: lora_bgmv(x, y, a, b, ids, 0.5) * 1.0,
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, y.clone()), lora_bgmv(x, y.clone(), a, b, ids, 0.5))


def test_bgmv_interpreted_on_cpu_matches_float64():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    code = ("import torch, test_lora_bgmv as t; "
            "t.check_against_reference('cpu'); t.check_op_registration('cpu'); print('OK')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]


@requires_cuda
def test_bgmv_compiled_on_cuda_matches_float64():
    check_against_reference("cuda")
    check_op_registration("cuda")


@requires_cuda
def test_bgmv_under_cuda_graph_capture():
    from pedro_ext.bench.lora_bgmv import lora_bgmv
    x = torch.randn(4, 1, 256, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(5, 256, 16, device="cuda", dtype=torch.bfloat16) * 0.06
    b = torch.randn(5, 16, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([3, -1, 0, 3], device="cuda")
    y = torch.randn(4, 1, 512, device="cuda", dtype=torch.bfloat16)
    expected = reference(x.cpu(), y.cpu(), a.cpu(), b.cpu(), ids.cpu(), 0.5)
    y0 = y.clone()
    lora_bgmv(x, y.clone(), a, b, ids, 0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_bgmv(x, y, a, b, ids, 0.5)
    y.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, expected, torch.bfloat16, "graph replay", tol=TOL[torch.bfloat16])


def test_bgmv_bad_input_raises_with_the_argument_named():
    from pedro_ext.bench import lora_bgmv as mod
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    a, b = torch.randn(3, 8, 4), torch.randn(3, 4, 6)
    ids = torch.tensor([0, 2])
    cases = [((y, x, a[:, :7], b, ids, 1), "a has shape"),
             ((y[:, :5], x, a, b, ids, 1), "y has shape"),
             ((y, x, a, b, ids.int(), 1), "int64"),
             ((y, x, a, b, ids, 2), "rows_per_id"),
             ((y, x, a.double(), b, ids, 1), "dtype"),
             ((y.t(), x.t(), a, b, ids, 1), "shape"),
             ((y, x, a, b, torch.tensor([0, 9, 2])[::2], 1), "contiguous")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            torch.ops.pedro_ext_bench.lora_bgmv_(*args, 1.0)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        mod.check_ids(torch.tensor([0, 3]), 3)
    mod.check_ids(torch.tensor([-1, 2]), 3)


@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET")) or torch.cuda.is_available(),
                    reason="the kernels can run here")
def test_bgmv_without_a_gpu_says_why_and_leaves_y_alone():
    from pedro_ext.bench.lora_bgmv import lora_bgmv, unavailable_reason
    assert "CUDA" in unavailable_reason("cpu")
    y = torch.randn(2, 6)
    y0 = y.clone()
    with pytest.raises(RuntimeError, match="CUDA"):
        lora_bgmv(torch.randn(2, 8), y, torch.randn(3, 8, 4), torch.randn(3, 4, 6),
                  torch.tensor([0, 1]), 1.0)
    assert torch.equal(y, y0)
