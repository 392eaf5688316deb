"""The op layer against the pure-PyTorch reference (computed in float64), on the CPU, plus
gradcheck, opcheck, torch.compile and bad-input checks."""
import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref
from pedro_ext.activations import GELU_DEN, GELU_NUM, gelu

from conftest import assert_close
from helpers import bank_args, make_bank, random_ids

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (B, N, d, r, D): B in 0..64, dims that are not multiples of 8, N up to 100.
GEN_SHAPES = [(0, 3, 5, 3, 7), (1, 1, 9, 1, 13), (7, 5, 33, 12, 101), (64, 100, 21, 7, 67),
              (17, 2, 1, 5, 1), (5, 0, 4, 2, 3)]


def double_all(tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


def ref_grads(fn, inputs, grad_out):
    """Gradients of the float64 reference w.r.t. every floating input."""
    leaves = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    if out.requires_grad:  # an empty bank makes the reference constant
        out.backward(grad_out.double())
    return out.detach(), [_grad_or_zero(t) for t in leaves]


def _grad_or_zero(t):
    if not t.is_floating_point():
        return None
    return t.grad if t.grad is not None else torch.zeros_like(t)


def kernel_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [_grad_or_zero(t) for t in leaves]


# ----------------------------------------------------------------------- rational
def test_gelu_coefficients_fit_gelu():
    z = torch.linspace(-3, 3, 2001, dtype=torch.float64)
    got = pedro_ext.rational(z, torch.tensor(GELU_NUM, dtype=torch.float64),
                             torch.tensor(GELU_DEN, dtype=torch.float64))
    assert (got - gelu(z)).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (3, 5, 1031)])
@pytest.mark.parametrize("degrees", [(6, 4), (4, 3), (1, 0)])
def test_rational_matches_reference(dtype, shape, degrees):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    x.view(-1)[: min(3, x.numel())] = 0  # sign(0) convention
    num = (torch.randn(degrees[0], generator=g) * 0.5).to(dtype)
    den = (torch.randn(degrees[1], generator=g) * 0.5).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    out, grads = kernel_grads(pedro_ext.rational, [x, num, den], grad)
    exp, exp_grads = ref_grads(ref.rational, [x, num, den], grad)
    assert_close(out, exp, dtype, "rational")
    for name, a, e in zip(["x", "rat_num", "rat_den"], grads, exp_grads):
        # half-precision coefficient grads are sums of thousands of terms, rounded once to
        # 8-11 mantissa bits; their inputs x are themselves rounded
        loose = dtype in (torch.float16, torch.bfloat16) and name != "x"
        assert_close(a, e, dtype, f"grad {name}", tol=5e-2 if loose else None)


# ----------------------------------------------------------------------- generate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEN_SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_generate_matches_reference(dtype, shape, id_dtype):
    b, n, d, r, big_d = shape
    bank = make_bank(n, d, r, big_d, dtype=dtype, seed=b + n)
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(b, d, generator=g).to(dtype)
    ids = random_ids(b, n, seed=3, dtype=id_dtype)
    grad = torch.randn(b, big_d, generator=g).to(dtype)
    inputs = [pooled, ids, *bank_args(bank)]
    out, grads = kernel_grads(pedro_ext.generate, inputs, grad)
    exp, exp_grads = ref_grads(ref.generate, inputs, grad)
    assert_close(out, exp, dtype, "vectors")
    assert torch.all(out[ids == -1] == 1), "a row without adapter must be exactly 1"
    names = ["pooled", None, "w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up"]
    for name, a, e in zip(names, grads, exp_grads):
        if name is None:
            continue
        assert_close(a, e, dtype, f"grad {name}")


def test_generate_unused_adapters_get_zero_grad():
    bank = make_bank(6, 5, 3, 4)
    pooled = torch.randn(3, 5)
    ids = torch.tensor([1, 1, -1])
    leaves = [t.clone().requires_grad_() for t in bank_args(bank)]
    pedro_ext.generate(pooled, ids, *leaves).sum().backward()
    for t in leaves:
        unused = [i for i in range(6) if i != 1]
        assert torch.all(t.grad[unused] == 0)
        assert t.grad[1].abs().sum() > 0


def test_generate_accepts_column_slices_of_w_up():
    bank = make_bank(4, 6, 3, 20)
    pooled = torch.randn(5, 6)
    ids = torch.tensor([0, 3, -1, 3, 2])
    full = pedro_ext.generate(pooled, ids, *bank_args(bank))
    args = bank_args(bank)
    args[4], args[5] = bank["w_up"][:, :, 7:15], bank["b_up"][:, 7:15]
    sliced = pedro_ext.generate(pooled, ids, *args)
    assert torch.equal(sliced, full[:, 7:15])


def test_generate_backward_is_deterministic():
    bank = make_bank(3, 40, 8, 50)
    pooled = torch.randn(64, 40)
    ids = random_ids(64, 3, seed=5, none_fraction=0.0)
    grad = torch.randn(64, 50)
    runs = [kernel_grads(pedro_ext.generate, [pooled, ids, *bank_args(bank)], grad)[1]
            for _ in range(2)]
    for a, b in zip(*runs):
        if a is not None:
            assert torch.equal(a, b)


# ----------------------------------------------------------------------- modulate
MOD_SHAPES = [(0, 3, 5), (3, 0, 5), (1, 1, 1), (4, 7, 13), (2, 300, 37), (64, 2, 64), (3, 5, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MOD_SHAPES)
@pytest.mark.parametrize("layout", ["padded", "packed", "sliced"])
def test_modulate_matches_reference(dtype, shape, layout):
    b, t, big_d = shape
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(b, big_d + 9, generator=g).to(dtype)
    vectors = wide[:, 4:4 + big_d] if layout == "sliced" else wide[:, :big_d].contiguous()
    if layout == "packed":
        seq_ids = torch.randint(0, max(b, 1), (b * t,), generator=g) if b else torch.zeros(0, dtype=torch.long)
        x = torch.randn(b * t, big_d, generator=g).to(dtype)
        fn_k = lambda x, v: pedro_ext.modulate(x, v, seq_ids)  # noqa: E731
        fn_r = lambda x, v: ref.modulate(x, v, seq_ids)  # noqa: E731
    else:
        x = torch.randn(b, t, big_d, generator=g).to(dtype)
        fn_k, fn_r = pedro_ext.modulate, ref.modulate
    grad = torch.randn(x.shape, generator=g).to(dtype)
    out, grads = kernel_grads(fn_k, [x, vectors], grad)
    exp, exp_grads = ref_grads(fn_r, [x, vectors], grad)
    assert_close(out, exp, dtype, "modulate")
    assert_close(grads[0], exp_grads[0], dtype, "grad x")
    assert_close(grads[1], exp_grads[1], dtype, "grad vectors")


def test_modulate_is_exact_product_for_float32():
    x = torch.randn(3, 4, 19)
    v = torch.randn(3, 19)
    assert torch.equal(pedro_ext.modulate(x, v), x * v[:, None, :])


# ----------------------------------------------------------------------- fused prefill
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_generate_and_modulate_matches_reference(dtype, layout):
    n, d, r, big_d, b, t = 4, 11, 5, 30, 6, 9
    bank = make_bank(n, d, r, big_d + 10, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    pooled = torch.randn(b, d, generator=g).to(dtype)
    ids = random_ids(b, n, seed=7)
    args = bank_args(bank)
    args[4], args[5] = bank["w_up"][:, :, 10:], bank["b_up"][:, 10:]  # a slice, like l_v
    seq_ids = torch.randint(0, b, (b * t,), generator=g) if layout == "packed" else None
    x = torch.randn(*((b * t,) if seq_ids is not None else (b, t)), big_d, generator=g).to(dtype)
    gy = torch.randn(x.shape, generator=g).to(dtype)
    gv = torch.randn(b, big_d, generator=g).to(dtype)

    def run(mod, as_ref):
        leaves = [x, pooled, *args]
        leaves = [a.detach().double() if as_ref else a.detach().clone() for a in leaves]
        for a in leaves:
            a.requires_grad_()
        y, v = (mod(leaves[0], seq_ids, leaves[1], ids, *leaves[2:]) if as_ref else
                mod(leaves[0], leaves[1], ids, *leaves[2:], seq_ids=seq_ids))
        ((y * (gy.double() if as_ref else gy)).sum() + (v * (gv.double() if as_ref else gv)).sum()).backward()
        return y.detach(), v.detach(), [a.grad for a in leaves]

    y, v, grads = run(pedro_ext.generate_and_modulate, False)
    ey, ev, egrads = run(ref.generate_and_modulate, True)
    assert_close(y, ey, dtype, "y")
    assert_close(v, ev, dtype, "vectors")
    for i, (a, e) in enumerate(zip(grads, egrads)):
        assert_close(a, e, dtype, f"grad {i}")
    # same numbers as the two ops one after the other
    v2 = pedro_ext.generate(pooled, ids, *args)
    assert torch.equal(v, v2)
    assert torch.equal(y, pedro_ext.modulate(x, v2, seq_ids))


# ----------------------------------------------------------------------- gradcheck / opcheck
def _small_problem(dtype=torch.float64):
    bank = make_bank(3, 4, 3, 5, dtype=dtype)
    pooled = torch.randn(4, 4, dtype=dtype)
    ids = torch.tensor([2, -1, 0, 2])
    return pooled, ids, bank_args(bank)


def test_gradcheck_all_ops():
    pooled, ids, args = _small_problem()
    leaves = [a.clone().requires_grad_() for a in [pooled, *args]]
    assert torch.autograd.gradcheck(lambda p, *a: pedro_ext.generate(p, ids, *a), leaves)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pedro_ext.modulate, (x, v))
    xs = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor([3, 0, 0, 2, 3, 1, 3])
    assert torch.autograd.gradcheck(lambda a, b: pedro_ext.modulate(a, b, seq), (xs, v))
    z = torch.randn(20, dtype=torch.float64, requires_grad=True)
    num = torch.randn(6, dtype=torch.float64, requires_grad=True)
    den = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pedro_ext.rational, (z, num, den))
    assert torch.autograd.gradcheck(
        lambda xx, p, *a: pedro_ext.generate_and_modulate(xx, p, ids, *a, seq_ids=seq[:7] % 4),
        [xs.detach().clone().requires_grad_(), *leaves])


def _opcheck_cases():
    pooled, ids, args = _small_problem(torch.float32)
    x = torch.randn(4, 3, 5)
    v = torch.randn(4, 5)
    seq = torch.tensor([3, 0, 0, 2, 3, 1, 3], dtype=torch.int32)
    xs = torch.randn(7, 5)
    ops = torch.ops.pedro_ext
    req = lambda ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    p, *a = req([pooled, *args])
    return [
        (ops.rational.default, (torch.randn(10, requires_grad=True), torch.randn(6), torch.randn(4))),
        (ops.rational_backward.default, (torch.randn(10), torch.randn(10), torch.randn(6), torch.randn(4))),
        (ops.generate.default, (p, ids, *a)),
        (ops.generate_backward.default, (torch.randn(4, 5), pooled, ids, *args[:5])),
        (ops.modulate.default, (x.clone().requires_grad_(), v.clone().requires_grad_(), None)),
        (ops.modulate.default, (xs, v, seq)),
        (ops.modulate_backward_vectors.default, (torch.randn(7, 5), xs, seq, 4)),
        (ops.modulate_backward_vectors.default, (torch.randn(4, 3, 5), x, None, 4)),
        (ops.generate_and_modulate.default, (xs.clone().requires_grad_(), seq, p, ids, *a)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_forward_and_backward():
    pooled, ids, args = _small_problem(torch.float32)
    x = torch.randn(4, 6, 5)

    def f(x, pooled, *bank):
        v = pedro_ext.generate(pooled, ids, *bank)
        return pedro_ext.modulate(x, v[:, 1:4], None).sum(), v

    leaves = [t.clone().requires_grad_() for t in [pooled, *args]]
    xx = x[..., 1:4].contiguous()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss, v = compiled(xx, *leaves)
    loss.backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss_e, v_e = f(xx, *leaves)
    loss_e.backward()
    assert torch.equal(v, v_e)
    torch.testing.assert_close(loss, loss_e)
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad)


# ----------------------------------------------------------------------- bad input
def _gen_args():
    pooled, ids, args = _small_problem(torch.float32)
    return [pooled, ids, *args]


def _replace(i, value):
    a = _gen_args()
    a[i] = value
    return a


BAD_GENERATE = [
    ("pooled must be 2-D", _replace(0, torch.randn(4))),
    ("w_down.size(1)", _replace(2, torch.randn(3, 5, 3))),
    ("adapter_ids must be 1-D of length 4", _replace(1, torch.tensor([0, 1]))),
    ("b_down.size(0)", _replace(3, torch.randn(2, 3))),
    ("w_up.size(1)", _replace(6, torch.randn(3, 2, 5))),
    ("b_up.size(1)", _replace(7, torch.randn(3, 6))),
    ("rat_num must be 2-D", _replace(4, torch.randn(6))),
    ("rat_den.size(0)", _replace(5, torch.randn(2, 4))),
    ("adapter_ids must be int32 or int64", _replace(1, torch.zeros(4))),
    ("w_down has dtype", _replace(2, torch.randn(3, 4, 3, dtype=torch.float64))),
    ("pooled must be float32, float16, bfloat16 or float64", _replace(0, torch.ones(4, 4, dtype=torch.int32))),
    ("adapter_ids values must lie in [-1, 3)", _replace(1, torch.tensor([0, 3, 1, 1]))),
    ("adapter_ids values must lie in [-1, 3)", _replace(1, torch.tensor([0, -2, 1, 1]))),
    ("w_up is on meta but pooled is on cpu", _replace(6, torch.randn(3, 3, 5, device="meta"))),
]


@pytest.mark.parametrize("message,args", BAD_GENERATE, ids=[m for m, _ in BAD_GENERATE])
def test_generate_bad_input_raises(message, args):
    with pytest.raises((ValueError, TypeError, IndexError), match=pytest.importorskip("re").escape(message)):
        pedro_ext.generate(*args)


BAD_MODULATE = [
    ("x must be 3-D", lambda: pedro_ext.modulate(torch.randn(4, 5), torch.randn(4, 5))),
    ("x.size(0) is the number of sequences B", lambda: pedro_ext.modulate(torch.randn(3, 2, 5), torch.randn(4, 5))),
    ("x.size(2) is the vector width D", lambda: pedro_ext.modulate(torch.randn(4, 2, 6), torch.randn(4, 5))),
    ("seq_ids values must lie in [0, 4)", lambda: pedro_ext.modulate(torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, 4, 1]))),
    ("seq_ids values must lie in [0, 4)", lambda: pedro_ext.modulate(torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, -1, 1]))),
    ("seq_ids must be 1-D of length 3", lambda: pedro_ext.modulate(torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, 1]))),
    ("seq_ids must be int32 or int64", lambda: pedro_ext.modulate(torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0., 1., 1.]))),
    ("vectors has dtype", lambda: pedro_ext.modulate(torch.randn(4, 2, 5), torch.randn(4, 5, dtype=torch.float16))),
    ("vectors must be 2-D", lambda: pedro_ext.modulate(torch.randn(4, 2, 5), torch.randn(4, 1, 5))),
    ("rat_num must be 1-D", lambda: pedro_ext.rational(torch.randn(3), torch.randn(2, 3), torch.randn(2))),
    ("rat_num needs at least one coefficient", lambda: pedro_ext.rational(torch.randn(3), torch.randn(0), torch.randn(2))),
    ("x.size(0) is the number of sequences B", lambda: pedro_ext.generate_and_modulate(torch.randn(5, 2, 5), *_gen_args())),
    ("x is on meta", lambda: pedro_ext.generate_and_modulate(torch.randn(4, 2, 5, device="meta"), *_gen_args())),
]


@pytest.mark.parametrize("message,fn", BAD_MODULATE, ids=[m for m, _ in BAD_MODULATE])
def test_modulate_bad_input_raises(message, fn):
    import re
    with pytest.raises((ValueError, TypeError, IndexError), match=re.escape(message)):
        fn()


def test_empty_batches():
    bank = make_bank(3, 4, 2, 5)
    v = pedro_ext.generate(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), *bank_args(bank))
    assert v.shape == (0, 5)
    y = pedro_ext.modulate(torch.randn(0, 7, 5), v)
    assert y.shape == (0, 7, 5)
    y, v = pedro_ext.generate_and_modulate(torch.randn(0, 5), torch.randn(0, 4),
                                           torch.zeros(0, dtype=torch.long), *bank_args(bank),
                                           seq_ids=torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 5) and v.shape == (0, 5)


def test_build_info():
    info = pedro_ext.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_archs"]
