"""CUDA kernels against the CPU kernels and the float64 reference. Skipped without a GPU."""
import re

import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref

from conftest import assert_close, requires_cuda
from helpers import bank_args, make_bank, random_ids

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _grads_of(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs], [t.grad if t.is_floating_point() else None for t in leaves]


def _compare_devices(fn, inputs, grads_out, dtype, ref_fn=None):
    cuda_in = [t.cuda() for t in inputs]
    cuda_out, cuda_grads = _grads_of(fn, cuda_in, [g.cuda() for g in grads_out])
    cpu_out, cpu_grads = _grads_of(fn, inputs, grads_out)
    ref_in = [t.double() if t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads = _grads_of(ref_fn or fn, ref_in, [g.double() for g in grads_out])
    for c, p, e in zip(cuda_out, cpu_out, ref_out):
        assert_close(c, e, dtype, "cuda forward vs reference")
        assert_close(p, e, dtype, "cpu forward vs reference")
    for i, (c, e) in enumerate(zip(cuda_grads, ref_grads)):
        if c is not None:
            assert_close(c, e if e is not None else torch.zeros_like(c), dtype, f"cuda grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 9, 1, 13), (37, 20, 65, 12, 301), (64, 100, 576, 16, 1000)])
def test_generate_cuda(dtype, shape):
    b, n, d, r, big_d = shape
    bank = make_bank(n, d, r, big_d, dtype=dtype)
    pooled = torch.randn(b, d).to(dtype)
    ids = random_ids(b, n, seed=1, dtype=torch.int32)
    gv = torch.randn(b, big_d).to(dtype)
    _compare_devices(pedro_ext.generate, [pooled, ids, *bank_args(bank)], [gv], dtype,
                     ref_fn=ref.generate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 300, 37), (64, 2, 11008), (5, 7, 1)])
@pytest.mark.parametrize("layout", ["padded", "packed", "sliced"])
def test_modulate_cuda(dtype, shape, layout):
    b, t, big_d = shape
    wide = torch.randn(b, big_d + 3).to(dtype)
    v = wide[:, 3:] if layout == "sliced" else wide[:, :big_d].contiguous()
    if layout == "packed":
        seq = torch.randint(0, b, (b * t,))
        x = torch.randn(b * t, big_d).to(dtype)
        fk = lambda x, v, s: pedro_ext.modulate(x, v, s)  # noqa: E731
        fr = lambda x, v, s: ref.modulate(x, v, s)  # noqa: E731
        inputs = [x, v, seq]
    else:
        x = torch.randn(b, t, big_d).to(dtype)
        fk = lambda x, v: pedro_ext.modulate(x, v)  # noqa: E731
        fr = lambda x, v: ref.modulate(x, v)  # noqa: E731
        inputs = [x, v]
    _compare_devices(fk, inputs, [torch.randn(x.shape).to(dtype)], dtype, ref_fn=fr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_generate_and_modulate_cuda(dtype, layout):
    n, d, r, big_d, b, t = 6, 100, 8, 700, 9, 33
    bank = make_bank(n, d, r, big_d + 64, dtype=dtype)
    args = bank_args(bank)
    args[4], args[5] = args[4][:, :, 64:], args[5][:, 64:]
    pooled = torch.randn(b, d).to(dtype)
    ids = random_ids(b, n, seed=2)
    seq = torch.randint(0, b, (b * t,)) if layout == "packed" else None
    x = torch.randn(*((b * t,) if seq is not None else (b, t)), big_d).to(dtype)

    def fk(x, p, i, *a):
        return pedro_ext.generate_and_modulate(x, p, i, *a, seq_ids=None if seq is None else seq.to(x.device))

    def fr(x, p, i, *a):
        return ref.generate_and_modulate(x, seq, p, i, *a)

    grads = [torch.randn(x.shape).to(dtype), torch.randn(b, big_d).to(dtype)]
    _compare_devices(fk, [x, pooled, ids, *args], grads, dtype, ref_fn=fr)


def test_rational_cuda():
    x = torch.randn(10007) * 3
    num, den = torch.randn(6), torch.randn(4)
    _compare_devices(pedro_ext.rational, [x, num, den], [torch.randn(10007)], torch.float32,
                     ref_fn=ref.rational)
    xb, nb, db = x.bfloat16(), num.bfloat16(), den.bfloat16()
    y = pedro_ext.rational(xb.cuda(), nb.cuda(), db.cuda())
    assert_close(y, ref.rational(xb.double(), nb.double(), db.double()), torch.bfloat16, "bf16")


def test_backward_is_bitwise_deterministic_cuda():
    bank = make_bank(8, 512, 16, 2048, dtype=torch.bfloat16, device="cuda")
    pooled = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (256,), device="cuda")  # many requests share each adapter
    x = torch.randn(256, 4, 2048, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in [x, pooled, *bank_args(bank)]]
        y, _ = pedro_ext.generate_and_modulate(leaves[0], leaves[1], ids, *leaves[2:])
        y.backward(gy)
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay():
    bank = make_bank(16, 256, 8, 1024, dtype=torch.float16, device="cuda")
    pooled = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    ids = torch.randint(-1, 16, (8,), device="cuda")
    x = torch.randn(8, 1, 1024, device="cuda", dtype=torch.float16)
    vectors = pedro_ext.generate(pooled, ids, *bank_args(bank))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs asks
        pedro_ext.modulate(x, vectors)
        pedro_ext.generate(pooled, ids, *bank_args(bank))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v_g = pedro_ext.generate(pooled, ids, *bank_args(bank))
        y_g = pedro_ext.modulate(x, v_g)
    for _ in range(3):
        pooled.copy_(torch.randn_like(pooled))
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(-1, 16, (8,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        v_e = ref.generate(pooled.double(), ids, *[a.double() for a in bank_args(bank)])
        assert_close(v_g, v_e, torch.float16, "graph vectors")
        assert torch.equal(y_g, pedro_ext.modulate(x, v_g))


def test_large_bank_cuda():
    n = 4096
    bank = make_bank(n, 512, 8, 1536, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, n, (128,), device="cuda")
    ids[::7] = -1
    ids[-1] = n - 1
    pooled = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    v = pedro_ext.generate(pooled, ids, *bank_args(bank))
    sel = ids.clamp(min=0)
    sub = {k: t[sel] for k, t in bank.items()}
    local = torch.where(ids >= 0, torch.arange(128, device="cuda"), -1)
    v_ref = ref.generate(pooled.double().cpu(), local.cpu(), *[t.double().cpu() for t in bank_args(sub)])
    assert_close(v, v_ref, torch.bfloat16, "N=4096")
    leaves = [t.clone().requires_grad_() for t in bank_args(bank)]
    pedro_ext.generate(pooled, ids, *leaves).float().sum().backward()
    used = torch.zeros(n, dtype=torch.bool, device="cuda")
    used[ids[ids >= 0]] = True
    assert torch.all(leaves[4].grad[~used] == 0)


def test_cuda_bad_ids_raise_and_never_read_out_of_bounds():
    bank = make_bank(3, 8, 2, 16, device="cuda")
    pooled = torch.randn(2, 8, device="cuda")
    with pytest.raises(IndexError, match=re.escape("adapter_ids values must lie in [-1, 3)")):
        pedro_ext.generate(pooled, torch.tensor([0, 3], device="cuda"), *bank_args(bank))
    with pytest.raises(IndexError, match=re.escape("seq_ids values must lie in [0, 2)")):
        pedro_ext.modulate(torch.randn(3, 16, device="cuda"), torch.randn(2, 16, device="cuda"),
                           torch.tensor([0, 2, 1], device="cuda"))
    with pytest.raises(ValueError, match="all arguments must be on one device"):
        pedro_ext.generate(pooled, torch.tensor([0, 1]), *bank_args(bank))
    pedro_ext.set_cuda_index_checks(False)
    try:  # with checks off, bad rows come out as NaN, good rows are unaffected
        v = pedro_ext.generate(pooled, torch.tensor([1_000_000, 1], device="cuda"), *bank_args(bank))
        assert torch.isnan(v[0]).all() and not torch.isnan(v[1]).any()
        y = pedro_ext.modulate(torch.randn(2, 16, device="cuda"), v, torch.tensor([1, -5], device="cuda"))
        assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
        torch.cuda.synchronize()
    finally:
        pedro_ext.set_cuda_index_checks(True)
