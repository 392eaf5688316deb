"""CUDA kernels against the float64 reference (and the CPU kernels). Skipped without a GPU.
Strided and sliced arguments are made on the device (a .cuda() copy of a slice is contiguous),
so the strided and the misaligned scalar paths are the ones tested."""
import re
import warnings

import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref
from pedro_ext.activations import GELU_DEN, GELU_NUM

from conftest import assert_close, requires_cuda
from helpers import (act_mul_layouts, assert_bitwise, bank_args, check_modulate_inplace_memory_rules,
                     make_bank, random_ids)

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


def _views_against_reference(fn, ref_fn, bases, views, grads_out, dtype):
    """fn on views of CUDA leaf tensors (slices made on the device) against ref_fn on the same
    views of float64 CPU copies: outputs, and the gradients of the bases."""
    def run(f, dev_bases, gs):
        args = [view(b) for b, view in zip(dev_bases, views)]
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, gs)
        return [o.detach() for o in outs], [b.grad if b.is_floating_point() else None for b in dev_bases]

    cuda_bases = [b.detach().clone().requires_grad_() if b.is_floating_point() else b for b in bases]
    ref_bases = [b.detach().double().cpu().requires_grad_() if b.is_floating_point() else b.cpu()
                 for b in bases]
    outs, grads = run(fn, cuda_bases, grads_out)
    r_outs, r_grads = run(ref_fn, ref_bases, [g.double().cpu() for g in grads_out])
    for i, (a, e) in enumerate(zip(outs, r_outs)):
        assert a.is_cuda
        assert_close(a, e, dtype, f"output {i}")
    for i, (a, e) in enumerate(zip(grads, r_grads)):
        if a is not None:
            assert_close(a, e, dtype, f"grad of input {i}")


def _same(t):
    return t


# ----------------------------------------------------------------------- generate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 9, 1, 13), (37, 20, 65, 12, 301), (64, 100, 576, 16, 1000),
                                   (5, 3, 70, 40, 33)])
def test_generate_cuda(dtype, shape):
    b, n, d, r, big_d = shape
    bank = make_bank(n, d, r, big_d, dtype=dtype)
    pooled = torch.randn(b, d).to(dtype)
    ids = random_ids(b, n, seed=1, dtype=torch.int32)
    gv = torch.randn(b, big_d).to(dtype)
    _compare_devices(pedro_ext.generate, [pooled, ids, *bank_args(bank)], [gv], dtype,
                     ref_fn=ref.generate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 3, 8])
def test_generate_cuda_with_w_up_sliced_on_device(dtype, offset):
    n, d, r, big_d, b = 4, 33, 6, 90, 7
    bank = make_bank(n, d, r, big_d + 17, dtype=dtype, device="cuda")
    pooled = torch.randn(b, d, device="cuda").to(dtype)
    ids = random_ids(b, n, seed=4, device="cuda")
    views = [_same, _same, _same, _same, _same, _same,
             lambda t: t[:, :, offset:offset + big_d], lambda t: t[:, offset:offset + big_d]]
    _views_against_reference(pedro_ext.generate, ref.generate, [pooled, ids, *bank_args(bank)],
                             views, [torch.randn(b, big_d, device="cuda").to(dtype)], dtype)


# ----------------------------------------------------------------------- modulate
MOD_LAYOUTS = ["padded", "packed", "sliced", "sliced_aligned", "misaligned_x", "strided_x",
               "odd_row_stride", "uneven_rows"]


def _x_case(layout, b, t, big_d, dtype):
    """(base, view) of a padded x [B, T, D] in one of the row layouts the kernels distinguish."""
    dev = "cuda"
    if layout == "misaligned_x":  # base pointer one element past a 16-byte boundary
        x = torch.randn(b * t * big_d + 1, device=dev).to(dtype)
        return x, lambda z: z[1:].view(b, t, big_d)
    if layout == "strided_x":  # rows of a fused projection output
        return torch.randn(b, t, big_d + 11, device=dev).to(dtype), lambda z: z[..., 5:5 + big_d]
    if layout == "odd_row_stride":  # aligned base pointer; the odd row stride alone misaligns rows
        pad = 1 + big_d % 2
        return torch.randn(b, t, big_d + pad, device=dev).to(dtype), lambda z: z[..., :big_d]
    if layout == "uneven_rows":  # [T, B, D] seen as [B, T, D]: no single row stride (a copy)
        return torch.randn(t, b, big_d, device=dev).to(dtype), lambda z: z.transpose(0, 1)
    return torch.randn(b, t, big_d, device=dev).to(dtype), _same


def _modulate_case(layout, b, t, big_d, dtype):
    """(bases, views, seq_ids) for one layout; every tensor made on the device."""
    dev = "cuda"
    seq = None
    if layout == "packed":
        seq = torch.randint(0, b, (b * t,), device=dev)
        x, x_view = torch.randn(b * t, big_d, device=dev).to(dtype), _same
    else:
        x, x_view = _x_case(layout, b, t, big_d, dtype)
    v = torch.randn(b, big_d + 16, device=dev).to(dtype)
    if layout == "sliced":
        v_view = lambda z: z[:, 3:3 + big_d]  # noqa: E731
    elif layout == "sliced_aligned":
        v_view = lambda z: z[:, 8:8 + big_d]  # noqa: E731
    else:
        v_view = lambda z: z[:, :big_d]  # noqa: E731
    return x, v, x_view, v_view, seq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 300, 37), (64, 2, 11008), (5, 7, 1), (2, 3, 520)])
@pytest.mark.parametrize("layout", MOD_LAYOUTS)
def test_modulate_cuda(dtype, shape, layout):
    b, t, big_d = shape
    x, v, x_view, v_view, seq = _modulate_case(layout, b, t, big_d, dtype)
    grad = torch.randn(x_view(x).shape, device="cuda").to(dtype)
    _views_against_reference(lambda a, c: pedro_ext.modulate(a, c, seq),
                             lambda a, c: ref.modulate(a, c, None if seq is None else seq.cpu()),
                             [x, v], [x_view, v_view], [grad], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", MOD_LAYOUTS)
def test_modulate_inplace_cuda(dtype, layout):
    b, t, big_d = 3, 5, 300
    x, v, x_view, v_view, seq = _modulate_case(layout, b, t, big_d, dtype)
    expected = pedro_ext.modulate(x_view(x), v_view(v), seq)
    exp_ref = ref.modulate(x_view(x).double().cpu(), v_view(v).double().cpu(),
                           None if seq is None else seq.cpu())
    after = x.clone()
    x_view(after).copy_(expected)  # x with the view's elements replaced, the rest untouched
    target = x_view(x)
    out = pedro_ext.modulate_(target, v_view(v), seq)
    assert out is target
    assert torch.equal(target, expected)
    assert_close(target, exp_ref, dtype, "modulate_")
    assert torch.equal(x, after)


def test_modulate_inplace_cuda_unevenly_strided_rows():
    x = torch.randn(4, 6, 10, device="cuda").transpose(0, 1)[:, :, 2:7]
    v = torch.randn(6, 5, device="cuda")
    expected = x * v[:, None, :]
    pedro_ext.modulate_(x, v)
    assert torch.equal(x, expected)


def test_modulate_inplace_cuda_memory_rules():
    check_modulate_inplace_memory_rules("cuda")


def _allocations(fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


def test_modulate_inplace_cuda_allocates_only_where_documented():
    """modulate_'s docstring: nothing for evenly spaced rows, contiguous vector columns apart from
    x, contiguous seq_ids and check_ids=False; temporaries otherwise."""
    dev = "cuda"
    v = torch.randn(4, 40, device=dev)[:, 3:35]  # a column slice: unit column stride
    seq = torch.tensor([0, 3, 3, 1, 2, 0], device=dev)
    padded, packed = torch.randn(4, 3, 32, device=dev), torch.randn(6, 50, device=dev)[:, 9:41]
    fused = torch.randn(4, 3, 96, device=dev)[..., 32:64]
    uneven = torch.randn(3, 4, 32, device=dev).transpose(0, 1)
    strided_v = torch.randn(32, 4, device=dev).t()
    none = {
        "padded": lambda: pedro_ext.modulate_(padded, v, check_ids=False),
        "strided rows": lambda: pedro_ext.modulate_(fused, v, check_ids=False),
        "packed": lambda: pedro_ext.modulate_(packed, v, seq, check_ids=False),
    }
    some = {
        "uneven rows": lambda: pedro_ext.modulate_(uneven, v, check_ids=False),
        "vectors in x": lambda: pedro_ext.modulate_(padded, padded[:, 0], check_ids=False),
        "strided vector columns": lambda: pedro_ext.modulate_(padded, strided_v, check_ids=False),
        "id check": lambda: pedro_ext.modulate_(packed, v, seq),
    }
    for name, fn in {**none, **some}.items():
        fn()  # warm-up
    for name, fn in none.items():
        assert _allocations(fn) == 0, name
    for name, fn in some.items():
        assert _allocations(fn) > 0, name


# ----------------------------------------------------------------------- act_mul_modulate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed", "fused_gate_up", "misaligned",
                                    "odd_row_stride", "uneven_rows"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_modulate_cuda(dtype, layout, activation):
    b, t, big_d = 4, 9, 1031
    dev = "cuda"
    seq = None
    v = (torch.randn(b, big_d + 5, device=dev) * 0.5 + 1).to(dtype)
    views = [None, None, lambda z: z[:, 5:]]
    if layout == "packed":
        seq = torch.randint(0, b, (23,), device=dev)
        bases = [(torch.randn(23, big_d, device=dev) * 3).to(dtype), torch.randn(23, big_d, device=dev).to(dtype), v]
        views[:2] = [_same, _same]
    elif layout == "fused_gate_up":  # halves of one fused projection (Phi-3 style)
        gate_up = (torch.randn(b, t, 2 * big_d, device=dev) * 3).to(dtype)
        bases = [gate_up, gate_up.detach().clone(), v]
        views[:2] = [lambda z: z[..., :big_d], lambda z: z[..., big_d:]]
    elif layout == "misaligned":
        bases = [(torch.randn(b * t * big_d + 1, device=dev) * 3).to(dtype),
                 torch.randn(b * t * big_d + 2, device=dev).to(dtype), v]
        views[:2] = [lambda z: z[1:].view(b, t, big_d), lambda z: z[2:].view(b, t, big_d)]
    elif layout in ("odd_row_stride", "uneven_rows"):
        (gate, gv), (up, uv) = _x_case(layout, b, t, big_d, dtype), _x_case(layout, b, t, big_d, dtype)
        bases, views[:2] = [gate * 3, up, v], [gv, uv]
    else:
        bases = [(torch.randn(b, t, big_d, device=dev) * 3).to(dtype), torch.randn(b, t, big_d, device=dev).to(dtype), v]
        views[:2] = [_same, _same]
    shape = views[0](bases[0]).shape
    seq_cpu = None if seq is None else seq.cpu()
    _views_against_reference(
        lambda g, u, w: pedro_ext.act_mul_modulate(g, u, w, seq, activation),
        lambda g, u, w: ref.act_mul_modulate(g, u, w, seq_cpu, activation),
        bases, views, [torch.randn(shape, device=dev).to(dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_modulate_cuda_is_eager_torch_bitwise(dtype, activation):
    """As the CPU test: vectors of ones give torch's CUDA act(gate) * up exactly, other vectors
    eager torch's (act(gate) * up) * v."""
    act = ref.activation_fn(activation)
    for layout, gate, up, seq, b in act_mul_layouts(dtype, "cuda"):
        d = gate.shape[-1]
        ones = torch.ones(b, d, dtype=dtype, device="cuda")
        assert_bitwise(pedro_ext.act_mul_modulate(gate, up, ones, seq, activation), act(gate) * up,
                       f"{layout}, ones")
        v = (torch.randn(b, d + 3, device="cuda") * 0.5 + 1).to(dtype)[:, 1:1 + d]
        rows = v[:, None] if seq is None else v[seq]
        assert_bitwise(pedro_ext.act_mul_modulate(gate, up, v, seq, activation),
                       act(gate) * up * rows, f"{layout}, random vectors")


# ----------------------------------------------------------------------- fused prefill
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_generate_and_modulate_cuda(dtype, layout):
    n, d, r, big_d, b, t = 6, 100, 8, 700, 9, 33
    dev = "cuda"
    bank = make_bank(n, d, r, big_d + 64, dtype=dtype, device=dev)
    pooled = torch.randn(b, d, device=dev).to(dtype)
    ids = random_ids(b, n, seed=2, device=dev)
    seq = torch.randint(0, b, (b * t,), device=dev) if layout == "packed" else None
    x = torch.randn(*((b * t,) if seq is not None else (b, t)), big_d, device=dev).to(dtype)
    views = [_same, _same, _same, *([_same] * 4), lambda w: w[:, :, 64:], lambda w: w[:, 64:]]
    seq_cpu = None if seq is None else seq.cpu()
    grads = [torch.randn(x.shape, device=dev).to(dtype), torch.randn(b, big_d, device=dev).to(dtype)]
    _views_against_reference(
        lambda xx, p, i, *a: pedro_ext.generate_and_modulate(xx, p, i, *a, seq_ids=seq),
        lambda xx, p, i, *a: ref.generate_and_modulate(xx, seq_cpu, p, i, *a),
        [x, pooled, ids, *bank_args(bank)], views, grads, dtype)


@pytest.mark.parametrize("layout", ["padded", "packed_uneven"])
def test_generate_and_modulate_cuda_one_long_request(layout):
    """B = 1 (and very uneven packed requests): the rows are split over many blocks."""
    dev, dtype = "cuda", torch.bfloat16
    n, d, r, big_d = 3, 64, 8, 520
    bank = make_bank(n, d, r, big_d, dtype=dtype, device=dev)
    if layout == "padded":
        b, seq = 1, None
        x = torch.randn(1, 3000, big_d, device=dev).to(dtype)
    else:
        b = 3
        seq = torch.cat([torch.zeros(2900, dtype=torch.long), torch.ones(3, dtype=torch.long),
                         torch.full((40,), 2)])[torch.randperm(2943)].to(dev)
        x = torch.randn(2943, big_d, device=dev).to(dtype)
    pooled = torch.randn(b, d, device=dev).to(dtype)
    ids = torch.tensor([1, -1, 2][:b], device=dev)
    y, v = pedro_ext.generate_and_modulate(x, pooled, ids, *bank_args(bank), seq_ids=seq)
    seq_cpu = None if seq is None else seq.cpu()
    ey, ev = ref.generate_and_modulate(x.double().cpu(), seq_cpu, pooled.double().cpu(), ids.cpu(),
                                       *[a.double().cpu() for a in bank_args(bank)])
    assert_close(v, ev, dtype, "vectors")
    assert_close(y, ey, dtype, "y")
    assert torch.equal(y, pedro_ext.modulate(x, v, seq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["strided_x", "misaligned_x", "odd_row_stride", "uneven_rows"])
def test_generate_and_modulate_cuda_row_layouts_with_split_rows(dtype, layout):
    """x's row layouts in the fused prefill, with D over one 256-column tile (700: three tiles,
    the last partial) and each request's 600 rows split over many blocks."""
    n, d, r, big_d, b, t = 4, 96, 8, 700, 2, 600
    bank = make_bank(n, d, r, big_d, dtype=dtype, device="cuda")
    pooled = torch.randn(b, d, device="cuda").to(dtype)
    ids = torch.tensor([2, 0], device="cuda")
    x, x_view = _x_case(layout, b, t, big_d, dtype)
    views = [x_view, _same, _same, *([_same] * 6)]
    grads = [torch.randn(b, t, big_d, device="cuda").to(dtype),
             torch.randn(b, big_d, device="cuda").to(dtype)]
    _views_against_reference(
        lambda xx, p, i, *a: pedro_ext.generate_and_modulate(xx, p, i, *a),
        lambda xx, p, i, *a: ref.generate_and_modulate(xx, None, p, i, *a),
        [x, pooled, ids, *bank_args(bank)], views, grads, dtype)


def _fused_with_grads(args, gy, gv, kernel):
    """[y, v, dx, dpooled, dbank...] of the fused prefill for args = [x, pooled, ids, seq_ids,
    *bank] and output gradients (gy, gv): pedro_ext's kernels (unchecked ids) or the reference."""
    x, pooled, ids, seq, *bank = args
    leaves = [t.clone().requires_grad_() for t in (x, pooled, *bank)]
    if kernel:
        y, v = pedro_ext.generate_and_modulate(leaves[0], leaves[1], ids, *leaves[2:], seq_ids=seq,
                                               check_ids=False)
    else:
        y, v = ref.generate_and_modulate(leaves[0], seq, leaves[1], ids, *leaves[2:])
    torch.autograd.backward([y, v], [gy.to(y), gv.to(v)])
    return [y, v] + [t.grad for t in leaves]


def test_generate_and_modulate_cuda_invalid_seq_ids_with_split_rows():
    """Unchecked invalid seq ids (below 0 and at or above B) among packed rows whose requests are
    split over many blocks: NaN rows, no gradient, the rest as the reference."""
    dev, dtype = "cuda", torch.float32
    n, d, r, big_d, b, s = 3, 64, 8, 520, 2, 3000
    g = torch.Generator().manual_seed(11)
    seq = torch.randint(0, b, (s,), generator=g)
    bad = torch.randperm(s, generator=g)[:110]
    seq[bad[:100]] = -1
    seq[bad[100:]] = torch.tensor([2, 3, 7, 1000, 2, 2, 5, 9, 2, 4])
    seq = seq.to(dev)
    bank = make_bank(n, d, r, big_d, dtype=dtype, device=dev)
    pooled = torch.randn(b, d, device=dev)
    ids = torch.tensor([1, 2], device=dev)
    x = torch.randn(s, big_d, device=dev)
    gy, gv = torch.randn(s, big_d, device=dev), torch.randn(b, big_d, device=dev)
    args = [x, pooled, ids, seq, *bank_args(bank)]
    got = _fused_with_grads(args, gy, gv, kernel=True)
    exp = _fused_with_grads([t.double().cpu() if t.is_floating_point() else t.cpu() for t in args],
                            gy, gv, kernel=False)
    for i, (a, e) in enumerate(zip(got, exp)):
        _assert_same_nan(a, e, dtype, f"output/grad {i}")
    invalid = (seq < 0) | (seq >= b)
    assert torch.isnan(got[0][invalid]).all() and not torch.isnan(got[0][~invalid]).any()
    assert torch.all(got[2][invalid] == 0)


# ----------------------------------------------------------------------- rational
def test_rational_cuda():
    x = torch.randn(10007) * 3
    num, den = torch.randn(6), torch.randn(4)
    _compare_devices(pedro_ext.rational, [x, num, den], [torch.randn(10007)], torch.float32,
                     ref_fn=ref.rational)
    xb, nb, db = x.bfloat16(), num.bfloat16(), den.bfloat16()
    y = pedro_ext.rational(xb.cuda(), nb.cuda(), db.cuda())
    assert_close(y, ref.rational(xb.double(), nb.double(), db.double()), torch.bfloat16, "bf16")


def test_rational_backward_cuda_many_blocks():
    """More elements than 1024 blocks x 256 threads: the fixed block count loops."""
    n = 300_000
    x = (torch.randn(n, dtype=torch.float64) * 2).cuda()
    num, den = torch.randn(6, dtype=torch.float64).cuda(), torch.randn(4, dtype=torch.float64).cuda()
    grad = torch.randn(n, dtype=torch.float64).cuda()
    got = torch.ops.pedro_ext.rational_backward(grad, x, num, den)
    leaves = [t.cpu().clone().requires_grad_() for t in (x, num, den)]
    ref.rational(*leaves).backward(grad.cpu())
    for a, e in zip(got, leaves):
        torch.testing.assert_close(a.cpu(), e.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rational_backward_cuda_half(dtype):
    """rational_backward in the half types: grad_x elementwise, the coefficient gradients summed
    over 4099 elements in fp32 and rounded once."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4099, generator=g).to(dtype)
    num = (torch.tensor(GELU_NUM) + 0.02 * torch.randn(6, generator=g)).to(dtype)
    den = (torch.tensor(GELU_DEN) + 0.02 * torch.randn(4, generator=g)).to(dtype)
    _compare_devices(pedro_ext.rational, [x, num, den], [torch.randn(4099, generator=g).to(dtype)],
                     dtype, ref_fn=ref.rational)


# ----------------------------------------------------------------------- graphs, big banks
def test_cuda_graph_capture_and_replay():
    bank = make_bank(16, 256, 8, 1024, dtype=torch.float16, device="cuda")
    pooled = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    ids = torch.randint(-1, 16, (8,), device="cuda")
    x = torch.randn(8, 1, 1024, device="cuda", dtype=torch.float16)
    gate = torch.randn(8, 1, 1024, device="cuda", dtype=torch.float16)
    seq = torch.arange(8, device="cuda")
    x_inplace = torch.empty(8, 1024, device="cuda", dtype=torch.float16)

    def step():  # check_ids left at its default: skipped during capture
        v = pedro_ext.generate(pooled, ids, *bank_args(bank))
        y = pedro_ext.modulate(x, v)
        x_inplace.copy_(x[:, 0])
        pedro_ext.modulate_(x_inplace, v, seq)
        z = pedro_ext.act_mul_modulate(gate, x, v)
        return v, y, z

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs asks
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v_g, y_g, z_g = step()
    for _ in range(3):
        pooled.copy_(torch.randn_like(pooled))
        x.copy_(torch.randn_like(x))
        gate.copy_(torch.randn_like(gate))
        ids.copy_(torch.randint(-1, 16, (8,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        v_e = ref.generate(pooled.double().cpu(), ids.cpu(), *[a.double().cpu() for a in bank_args(bank)])
        assert_close(v_g, v_e, torch.float16, "graph vectors")
        assert torch.equal(y_g, pedro_ext.modulate(x, v_g))
        assert torch.equal(x_inplace, y_g[:, 0])
        assert torch.equal(z_g, pedro_ext.act_mul_modulate(gate, x, v_g))


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


def test_generate_backward_cuda_beyond_the_grid_y_limit():
    """Issue 8 item 2: d * r / 256 > 65535 blocks in grid y; the kernel loops instead."""
    n, d, r, big_d = 1, 16384, 1024, 8
    bank = make_bank(n, d, r, big_d, device="cuda")
    pooled = torch.randn(2, d, device="cuda")
    ids = torch.tensor([0, 0], device="cuda")
    gv = torch.randn(2, big_d, device="cuda")
    leaves = [t.clone().requires_grad_() for t in bank_args(bank)]
    pedro_ext.generate(pooled, ids, *leaves).backward(gv)
    ref_leaves = [t.double().clone().requires_grad_() for t in bank_args(bank)]
    ref.generate(pooled.double(), ids, *ref_leaves).backward(gv.double())
    for a, e in zip(leaves, ref_leaves):
        assert_close(a.grad, e.grad, torch.float32, "grad")


def _against_reference_with_grads(fn, ref_fn, inputs, grad, dtype):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    ref_leaves = [t.detach().to("cpu", torch.float64, copy=True).requires_grad_() for t in inputs]
    exp = ref_fn(*ref_leaves)
    exp.backward(grad.double().cpu())
    assert_close(out, exp, dtype, "output")
    for i, (a, e) in enumerate(zip(leaves, ref_leaves)):
        assert_close(a.grad, e.grad, dtype, f"grad {i}")


def test_modulate_and_act_mul_cuda_grid_stride_wrap_around():
    """(1, 8192, 4096) float32: more warp units than the grid has warps (the forward loops), more
    elements than the backward's threads, 8192 rows in 64 shares for the vector gradient."""
    b, t, big_d = 1, 8192, 4096
    warps = torch.cuda.get_device_properties(0).multi_processor_count * 32 * 8
    assert b * t * (big_d // 512) > warps, "the case no longer reaches the grid-stride loop"
    x, up = torch.randn(b, t, big_d, device="cuda"), torch.randn(b, t, big_d, device="cuda")
    v, grad = torch.randn(b, big_d, device="cuda"), torch.randn(b, t, big_d, device="cuda")
    _against_reference_with_grads(pedro_ext.modulate, ref.modulate, [x, v], grad, torch.float32)
    _against_reference_with_grads(lambda g, u, w: pedro_ext.act_mul_modulate(g, u, w),
                                  lambda g, u, w: ref.act_mul_modulate(g, u, w), [x * 3, up, v], grad,
                                  torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["aligned", "odd_row_stride"])
def test_vector_grads_cuda_16_byte_path_and_row_splits(dtype, layout):
    """The vector gradients of modulate and act_mul_modulate against the reference: 3 requests of
    ~1000 packed rows (16 shares each); D = 1024 with every row 16-byte aligned (the 16-byte
    loads), or rows 1025 elements apart (aligned base pointer, scalar loads)."""
    s, b, big_d = 3000, 3, 1024
    g = torch.Generator().manual_seed(13)
    seq = torch.randint(0, b, (s,), generator=g).cuda()
    pad = 0 if layout == "aligned" else 1

    # the bases are the wide tensors, sliced after the helper clones them (a clone of a slice
    # would be contiguous)
    def wide(scale=1.0):
        return (torch.randn(s, big_d + pad, device="cuda") * scale).to(dtype)

    def cols(z):
        return z[:, :big_d]

    gate, up = wide(3.0), wide()
    grad = torch.randn(s, big_d, device="cuda").to(dtype)
    v = (torch.randn(b, big_d, device="cuda") * 0.5 + 1).to(dtype)
    seq_cpu = seq.cpu()
    _views_against_reference(lambda a, c: pedro_ext.modulate(a, c, seq),
                             lambda a, c: ref.modulate(a, c, seq_cpu),
                             [up, v], [cols, _same], [grad], dtype)
    _views_against_reference(lambda a, u, c: pedro_ext.act_mul_modulate(a, u, c, seq, "gelu_tanh"),
                             lambda a, u, c: ref.act_mul_modulate(a, u, c, seq_cpu, "gelu_tanh"),
                             [gate, up, v], [cols, cols, _same], [grad], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_grads_cuda_beyond_the_grid_y_limit(dtype):
    """D above 65535 tiles of 32 x 16 bytes (8.4M float32 / 4.2M float64 columns): the vector
    gradient's blocks loop over column tiles, so every D the forward takes has a backward."""
    tile = 32 * 16 // torch.empty((), dtype=dtype).element_size()
    big_d = 65535 * tile + 300
    x = torch.randn(2, 1, big_d, device="cuda", dtype=dtype)
    v = torch.randn(2, big_d, device="cuda", dtype=dtype)
    grad = torch.randn(2, 1, big_d, device="cuda", dtype=dtype)
    _against_reference_with_grads(pedro_ext.modulate, ref.modulate, [x, v], grad, dtype)
    del x
    gate, up = torch.randn(1, 1, big_d, device="cuda", dtype=dtype), torch.randn(1, 1, big_d, device="cuda", dtype=dtype)
    _against_reference_with_grads(lambda a, u, c: pedro_ext.act_mul_modulate(a, u, c),
                                  lambda a, u, c: ref.act_mul_modulate(a, u, c),
                                  [gate, up, v[:1]], grad[:1], dtype)


# ----------------------------------------------------------------------- ids, syncs, devices
def _assert_same_nan(a, e, dtype, what):
    a, e = a.detach().cpu(), e.detach().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), what
    keep = ~torch.isnan(e)
    assert_close(a[keep], e[keep].to(a.dtype).double(), dtype, what)


def test_cuda_invalid_ids_follow_the_rule():
    """Issue 8 item 4: unchecked invalid ids give NaN rows (never uninitialised memory) and no
    gradient, exactly as the CPU kernels and the reference do."""
    bank = make_bank(3, 8, 2, 16, device="cuda")
    pooled = torch.randn(4, 8, device="cuda")
    ids = torch.tensor([1, 1_000_000, -1, -7], device="cuda")
    seq = torch.tensor([0, 5, 1, 2, -1, 3, 0, 99], device="cuda")
    x = torch.randn(8, 16, device="cuda")
    gate = torch.randn(8, 16, device="cuda")
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731

    gy, gv = torch.randn(8, 16), torch.randn(4, 16)
    args = [x, pooled, ids, seq, *bank_args(bank)]
    got = _fused_with_grads(args, gy, gv, kernel=True)
    on_cpu = _fused_with_grads(cpu(args), gy, gv, kernel=True)
    exp = _fused_with_grads([t.double() if t.is_floating_point() else t for t in cpu(args)],
                            gy, gv, kernel=False)
    for i, (a, c, e) in enumerate(zip(got, on_cpu, exp)):
        _assert_same_nan(a, e, torch.float32, f"fused {i} vs reference")
        _assert_same_nan(a, c, torch.float32, f"fused {i} vs cpu")
    v = got[1]
    assert torch.isnan(v[[1, 3]]).all() and torch.equal(v[2], torch.ones(16, device="cuda"))
    assert torch.isnan(got[0][[1, 4, 7]]).all()
    assert torch.all(got[2][[1, 4, 7]] == 0)  # rows with an invalid seq id pass no gradient
    assert torch.all(got[3][[1, 3]] == 0)  # requests with an invalid adapter neither

    vv = torch.randn(4, 16, device="cuda")
    for name, fn, fr in [
        ("modulate", lambda: pedro_ext.modulate(x, vv, seq, check_ids=False),
         lambda: ref.modulate(x.cpu(), vv.cpu(), seq.cpu())),
        ("act_mul_modulate", lambda: pedro_ext.act_mul_modulate(gate, x, vv, seq, check_ids=False),
         lambda: ref.act_mul_modulate(gate.cpu(), x.cpu(), vv.cpu(), seq.cpu())),
        ("modulate_", lambda: pedro_ext.modulate_(x.clone(), vv, seq, check_ids=False),
         lambda: ref.modulate(x.cpu(), vv.cpu(), seq.cpu())),
    ]:
        _assert_same_nan(fn(), fr(), torch.float32, name)
    pedro_ext.set_cuda_index_checks(False)
    try:  # the process-wide switch for servers
        v = pedro_ext.generate(pooled, ids, *bank_args(bank))
        assert torch.isnan(v[1]).all() and not torch.isnan(v[0]).any()
    finally:
        pedro_ext.set_cuda_index_checks(True)
    torch.cuda.synchronize()


_SYNC = "called a synchronizing CUDA operation"


def _count_syncs(fn, capfd):
    """Host syncs during fn, as torch's sync debug mode reports them: a Python warning, or a
    line on stderr when the sync happens inside an extension op (not converted to a warning).
    Not the once-per-process "Synchronization debug mode is a prototype feature" warning."""
    torch.cuda.synchronize()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(_SYNC in str(w.message) for w in caught) + capfd.readouterr().err.count(_SYNC)


def test_id_checks_cost_one_sync_and_none_when_validated(capfd):
    """Issue 8 item 7: one host sync per checked call (both id tensors in one copy), none with
    check_ids=False."""
    bank = make_bank(3, 8, 2, 16, device="cuda")
    pooled = torch.randn(2, 8, device="cuda")
    ids = torch.tensor([0, 2], device="cuda")
    seq = torch.tensor([0, 1, 1], device="cuda")
    x = torch.randn(3, 16, device="cuda")
    v = torch.randn(2, 16, device="cuda")
    calls = {
        "generate": lambda c: pedro_ext.generate(pooled, ids, *bank_args(bank), check_ids=c),
        "modulate": lambda c: pedro_ext.modulate(x, v, seq, check_ids=c),
        "modulate_": lambda c: pedro_ext.modulate_(x.clone(), v, seq, check_ids=c),
        "act_mul_modulate": lambda c: pedro_ext.act_mul_modulate(x, x, v, seq, check_ids=c),
        "generate_and_modulate": lambda c: pedro_ext.generate_and_modulate(
            x, pooled, ids, *bank_args(bank), seq_ids=seq, check_ids=c),
    }
    for name, call in calls.items():
        call(True)  # warm-up
        assert _count_syncs(lambda: call(False), capfd) == 0, name
        assert _count_syncs(lambda: call(True), capfd) == 1, name
    assert _count_syncs(lambda: pedro_ext.modulate(x.view(1, 3, 16), v[:1]), capfd) == 0


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
    torch.cuda.synchronize()


def test_generate_backward_cuda_refuses_a_cpu_grad():
    """Issue 8 item 3: a CPU grad is refused, not read as a device pointer."""
    bank = make_bank(3, 8, 2, 16, device="cuda")
    pooled = torch.randn(2, 8, device="cuda")
    ids = torch.tensor([0, 2], device="cuda")
    with pytest.raises(ValueError, match="grad is on cpu but pooled is on cuda"):
        torch.ops.pedro_ext.generate_backward(torch.randn(2, 16), pooled, ids, *bank_args(bank)[:5])
    torch.cuda.synchronize()


# ----------------------------------------------------------------------- determinism
# Last in the file: the heaviest test, so a -x run (gpu_check.sh's sanitizer subset) meets the
# cheap ones first.
def _twice(fn):
    return [fn() for _ in range(2)]


def test_backward_is_bitwise_deterministic_cuda():
    bank = make_bank(8, 512, 16, 2048, dtype=torch.bfloat16, device="cuda")
    pooled = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (256,), device="cuda")  # many requests share each adapter
    x = torch.randn(256, 4, 2048, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)

    def fused():
        leaves = [t.clone().requires_grad_() for t in [x, pooled, *bank_args(bank)]]
        y, _ = pedro_ext.generate_and_modulate(leaves[0], leaves[1], ids, *leaves[2:])
        y.backward(gy)
        return [t.grad for t in leaves]

    seq = torch.randint(0, 4, (5000,), device="cuda")  # ~1250 rows per request: many shares
    g, u = torch.randn(5000, 1536, device="cuda"), torch.randn(5000, 1536, device="cuda")
    v = torch.randn(4, 1536, device="cuda")
    gout = torch.randn(5000, 1536, device="cuda")

    def act_mul():
        leaves = [t.clone().requires_grad_() for t in (g, u, v)]
        pedro_ext.act_mul_modulate(leaves[0], leaves[1], leaves[2], seq, "gelu_tanh").backward(gout)
        return [t.grad for t in leaves]

    def packed_modulate():
        leaves = [t.clone().requires_grad_() for t in (u, v)]
        pedro_ext.modulate(leaves[0], leaves[1], seq).backward(gout)
        return [t.grad for t in leaves]

    xr = torch.randn(500_000, device="cuda")
    num, den = torch.randn(6, device="cuda"), torch.randn(4, device="cuda")

    def rational():
        return list(torch.ops.pedro_ext.rational_backward(xr, xr.sin(), num, den))

    for fn in (fused, act_mul, packed_modulate, rational):
        first, second = _twice(fn)
        for a, b in zip(first, second):
            assert torch.equal(a, b), fn.__name__
