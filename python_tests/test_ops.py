"""The op layer against the pure-PyTorch reference (computed in float64), on the CPU, plus
gradcheck, opcheck, torch.compile and bad-input checks."""
import os
import platform

import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref
from pedro_ext.activations import (GELU_DEN, GELU_NUM, GELU_WIDE_DEN, GELU_WIDE_NUM, gelu,
                                   rational_init)

from conftest import assert_close, requires_cuda
from helpers import (act_mul_layouts, assert_bitwise, bank_args, check_modulate_inplace_memory_rules,
                     make_bank, random_ids)

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


def _rational_plain_f64(x, num, den):
    """The textbook formula, in float64: exact enough for |x| <= 1e30 at degrees <= (5, 4)."""
    p = sum(c * x ** j for j, c in enumerate(num))
    a = sum(d * x ** (k + 1) for k, d in enumerate(den))
    return p / (1 + a.abs())


def _rational_error_scales_f64(x, num, den):
    """For R and each gradient, per entry, the size of the terms it is computed from: float
    rounding is relative to them, not to the result, which cancels where R crosses zero or
    levels off. R and dR/dd_k = -sign(A) x^k P / Q^2 carry P's rounding, relative to
    sum |c_j x^j|; dR/dx = P'/Q - sign(A) A' P / Q^2, relative to |P'/Q| + |A' P / Q^2|;
    dR/dc_j = x^j / Q has no cancellation."""
    p = sum(c * x ** j for j, c in enumerate(num))
    p_terms = sum((c * x ** j).abs() for j, c in enumerate(num))
    dp = sum(j * c * x ** (j - 1) for j, c in enumerate(num) if j)
    a = sum(d * x ** (k + 1) for k, d in enumerate(den))
    da = sum((k + 1) * d * x ** k for k, d in enumerate(den))
    q = 1 + a.abs()
    return [p_terms / q, (dp / q).abs() + (da * p / q ** 2).abs(),
            torch.cat([x.abs() ** j / q for j in range(len(num))]),
            torch.cat([x.abs() ** (k + 1) * p_terms / q ** 2 for k in range(len(den))])]


def _rational_on_cuda(x, num, den):
    return pedro_ext.rational(x.cuda(), num.cuda(), den.cuda()).cpu()


def _coefficients(kind, g):
    if kind == "gelu":
        return torch.tensor(GELU_WIDE_NUM).double(), torch.tensor(GELU_WIDE_DEN).double()
    if kind == "identity":  # a documented init: R(z) = z exactly
        return rational_init("identity", 5, 4)
    if kind == "zero tops":  # R = 1 / (1 + |z|): zero highest coefficients on both sides
        return (torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64),
                torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    if kind == "tiny":  # Q ~ |d_n| z^n: Q^2 of the scaled terms would underflow
        num, den = _coefficients("gelu", g)
        return num * 1e-20, den * 1e-20
    if kind == "tiny top":
        return (torch.tensor([0.0, 1.0], dtype=torch.float64),
                torch.tensor([0.0, 0.0, 0.0, 1e-36], dtype=torch.float64))
    if kind == "huge":  # the bound's own arithmetic overflows: no plain formula beyond |z| = 1
        return (torch.tensor([0.0, 1e38], dtype=torch.float64),
                torch.tensor([1.0], dtype=torch.float64))
    m, n = kind
    return (torch.randn(m + 1, generator=g, dtype=torch.float64),
            torch.randn(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["kernel", "reference", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("coefs", ["gelu", "identity", "zero tops", "tiny", "tiny top", "huge",
                                   (4, 4), (3, 4), (5, 3)], ids=str)
def test_rational_far_outside_the_fit_is_finite_and_accurate(impl, coefs):
    """float32 terms overflow at |x| ~ 1e5 (x^9 in the gradients) long before R or its
    gradients do: the value and every gradient entry must match float64 up to |x| = 1e30, to
    float32 rounding of the terms each is computed from."""
    fn = dict(kernel=pedro_ext.rational, reference=ref.rational, cuda=_rational_on_cuda)[impl]
    num, den = _coefficients(coefs, torch.Generator().manual_seed(5))
    checked = 0
    for v in (0.75, 3.0, 4.0, 1e3, 2 ** 11, 3e3, 1e5, 3e5, 1e7, 1e8, 2 ** 40, 1e12, 1e20, 1e30):
        for x, g in ((v, 1.0), (-v, 1.0), (v, 2.0 ** 12), (-v, 2.0 ** -30), (v, 0.0)):
            x64 = torch.tensor([x], dtype=torch.float64)
            exp, exp_grads = kernel_grads(_rational_plain_f64, [x64, num, den],
                                          torch.full((1,), g, dtype=torch.float64))
            out, grads = kernel_grads(fn, [x64.float(), num.float(), den.float()],
                                      torch.full((1,), g))
            scales = _rational_error_scales_f64(x64, num, den)
            scales = scales[:1] + [sc * abs(g) for sc in scales[1:]]
            for name, a, e, scale in zip(["value", "grad x", "grad rat_num", "grad rat_den"],
                                         [out, *grads], [exp, *exp_grads], scales):
                a, fits = a.double(), e.abs() < 1e37  # else beyond float32 (e.g. dR/dc5 = x^5)
                where = f"{impl} {name} at x={x}, upstream gradient {g}"
                assert torch.isfinite(a[fits]).all(), f"{where}: {a}"
                assert (a[~fits].abs() >= 1e37).all(), f"{where}: {a}"
                # (1e-37: below float32's smallest normal number, 1.2e-38, precision runs out)
                ok = (a - e).abs()[fits] <= 1e-5 * scale[fits] + 1e-37
                assert ok.all(), f"{where}: {a} != {e}"
            checked += abs(x) >= 1e7 and g == 1.0 and bool(exp.abs() < 1e37)
    assert checked >= (0 if coefs == "huge" else 6)  # (huge: R itself overflows past |x| ~ 4)


def _rational_plain_f32(x, num, den, g):
    """The plain Horner formulas in float32 arithmetic, one point x per entry: value, dR/dx and
    the coefficient gradients g z^j / Q and -g sign(A) z^k P / Q^2 (as the kernels form them)."""
    p, dp = torch.zeros_like(x), torch.zeros_like(x)
    for c in reversed(num):
        dp = dp * x + p
        p = p * x + c
    s, ds = torch.zeros_like(x), torch.zeros_like(x)
    for d in reversed(den):
        ds = ds * x + s
        s = s * x + d
    a, da = x * s, s + x * ds
    q = 1 + a.abs()
    inv_q = 1 / q
    cd = -g * torch.sign(a) * p * inv_q * inv_q
    zp, grad_num = torch.ones_like(x), []
    for _ in num:
        grad_num.append(g * zp * inv_q)
        zp = zp * x
    zp, grad_den = x.clone(), []
    for _ in den:
        grad_den.append(cd * zp)
        zp = zp * x
    return p / q, dp / q - torch.sign(a) * da * p / (q * q), grad_num, grad_den


def test_rational_coefficient_gradients_are_the_plain_formulas_bit_for_bit_where_they_fit():
    """R = 1 / (1 + |x|) as (5, 4) coefficients with zero tops: beyond the bound where no
    check is needed (2^18 here) and below |x|^5 = 2^100, where the coefficient gradients' own
    products still fit, all four outputs are the plain float32 formulas', to the bit."""
    num = torch.tensor([1.0, 0, 0, 0, 0, 0])
    den = torch.tensor([1.0, 0, 0, 0])
    x = torch.linspace(2 ** 18.2, 2 ** 19.9, 41) * torch.tensor([1.0, -1.0]).repeat(21)[:41]
    for xi in x:
        point = xi.view(1)
        out, grads = kernel_grads(pedro_ext.rational, [point, num, den], torch.ones(1))
        value, dx, grad_num, grad_den = _rational_plain_f32(point, num, den, 1.0)
        assert_bitwise(out, value, f"value at {xi}")
        assert_bitwise(grads[0], dx, f"grad x at {xi}")
        assert_bitwise(grads[1], torch.cat(grad_num), f"grad rat_num at {xi}")
        assert_bitwise(grads[2], torch.cat(grad_den), f"grad rat_den at {xi}")


def test_rational_kernel_is_the_plain_formula_bit_for_bit_where_that_fits():
    """Wherever the terms of the textbook Horner evaluation are finite (checked per point
    beyond 2^11 for these coefficients) the kernel's value and gradients are its, to the bit."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4001, generator=g) * torch.logspace(-3, 3.5, 4001)
    num, den = torch.randn(6, generator=g) * 0.5, torch.randn(4, generator=g) * 0.5
    leaf = x.clone().requires_grad_()
    out = pedro_ext.rational(leaf, num, den)
    out.backward(torch.ones_like(out))
    value, dx, _, _ = _rational_plain_f32(x, num, den, 1.0)
    assert torch.isfinite(leaf.grad).all()
    assert_bitwise(out.detach(), value, "value")
    assert_bitwise(leaf.grad, dx, "grad x")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_generate_with_huge_pre_activations_stays_finite(device):
    """generate's kernels evaluate the rational unit with the same header: pre-activations z of
    1e6 to 1e12 (pooled states far out of scale) give finite vectors and gradients, each entry
    matching float64."""
    bank = make_bank(2, 8, 4, 16, seed=3)
    bank["w_down"] = bank["w_down"] * torch.logspace(6, 12, 4)  # 1e6 to 1e12 over the r columns
    pooled = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([0, 1, -1])
    grad = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    inputs = [pooled, ids, *bank_args(bank)]
    on_device = [t.to(device) for t in inputs]
    out, grads = kernel_grads(pedro_ext.generate, on_device, grad.to(device))
    exp, exp_grads = ref_grads(ref.generate, inputs, grad)
    for name, a, e in zip(["vectors", "pooled", None, "w_down", "b_down", "rat_num", "rat_den",
                           "w_up", "b_up"], [out, *grads], [exp, *exp_grads]):
        if name is None:
            continue
        a = a.cpu().double()
        assert torch.isfinite(a).all(), f"{name}: {a}"
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-30, msg=lambda m: f"{name}: {m}")


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


def test_generate_reads_column_slices_of_w_up_in_place_on_the_cpu():
    """Column slices of w_up / b_up (e.g. one target's part of a generator) are read with their
    strides, forward and backward, not copied; values and every gradient as the float64
    reference's."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(7)
    bank = {k: v.detach().requires_grad_() for k, v in make_bank(4, 6, 3, 20).items()}
    pooled = torch.randn(5, 6, generator=g).requires_grad_()
    ids = torch.tensor([0, 3, -1, 3, 2])
    args = bank_args(bank)
    args[4], args[5] = bank["w_up"][:, :, 7:15], bank["b_up"][:, 7:15]  # views of the leaves
    grad = torch.randn(5, 8, generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = pedro_ext.generate(pooled, ids, *args)
        got = torch.autograd.grad(out, [pooled, *bank.values()], grad)
    copies = [e.key for e in prof.key_averages() if e.key in ("aten::clone", "aten::contiguous")]
    assert not copies, copies
    leaves = [t.detach().double().requires_grad_() for t in (pooled, *bank.values())]
    wide = dict(zip(bank, leaves[1:]))
    ref_args = [wide[k] for k in ("w_down", "b_down", "rat_num", "rat_den")]
    want = ref.generate(leaves[0], ids, *ref_args, wide["w_up"][:, :, 7:15],
                        wide["b_up"][:, 7:15])
    assert_close(out, want, torch.float32, "vectors")
    for name, a, b in zip(["pooled", *bank], got, torch.autograd.grad(want, leaves, grad.double())):
        assert_close(a, b, torch.float32, name)


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
    g, u = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    return {
        "rational": (ops.rational.default, (torch.randn(10, requires_grad=True), torch.randn(6), torch.randn(4))),
        "rational_backward": (ops.rational_backward.default, (torch.randn(10), torch.randn(10), torch.randn(6), torch.randn(4))),
        "generate": (ops.generate.default, (p, ids, *a)),
        "generate_unchecked": (ops.generate.default, (p, ids, *a, False)),
        "generate_backward": (ops.generate_backward.default, (torch.randn(4, 5), pooled, ids, *args[:5])),
        "modulate": (ops.modulate.default, (x.clone().requires_grad_(), v.clone().requires_grad_(), None)),
        "modulate_packed": (ops.modulate.default, (xs, v, seq, False)),
        "modulate_": (ops.modulate_.default, (x.clone(), v, None)),
        "modulate_packed_": (ops.modulate_.default, (xs.clone(), v, seq, False)),
        "modulate_backward_x": (ops.modulate_backward_x.default, (torch.randn(7, 5), v, seq)),
        "modulate_backward_vectors": (ops.modulate_backward_vectors.default, (torch.randn(7, 5), xs, seq, 4)),
        "modulate_backward_vectors_padded": (ops.modulate_backward_vectors.default, (torch.randn(4, 3, 5), x, None, 4)),
        "generate_and_modulate": (ops.generate_and_modulate.default, (xs.clone().requires_grad_(), seq, p, ids, *a)),
        "act_mul_modulate": (ops.act_mul_modulate.default, (*req([g, u, v]), None, "silu")),
        "act_mul_modulate_packed": (ops.act_mul_modulate.default, (*req([xs, xs * 2, v]), seq, "gelu_tanh", False)),
        "act_mul_modulate_backward": (ops.act_mul_modulate_backward.default, (torch.randn(7, 5), xs, xs * 2, v, seq, "silu")),
    }


OPCHECK_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("case", OPCHECK_CASES)
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


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"),
                    reason="reads the x86 feature flags from /proc/cpuinfo")
def test_cpu_kernels_use_avx2_where_the_cpu_has_it():
    # Every AVX2 CPU, Intel or AMD, runs the AVX2 clone of the elementwise loops (an arch=haswell
    # clone was resolved by CPU model and left every CPU but Haswell on the SSE2 one).
    info = pedro_ext.build_info()
    if not info["cpu_kernel_clones"]:
        assert info["cpu_kernel_isa"] == "baseline"
        pytest.skip("this build has no clones to choose from (not GCC on x86-64)")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert info["cpu_kernel_isa"] == ("avx2" if "avx2" in flags else "baseline")


# ----------------------------------------------------------------------- invalid ids
def assert_close_nan(actual, expected, dtype, what):
    """assert_close where NaN must sit exactly where the reference has NaN."""
    exp_nan = torch.isnan(expected.detach().double().cpu())
    act_nan = torch.isnan(actual.detach().double().cpu())
    assert torch.equal(act_nan, exp_nan), f"{what}: NaN at {act_nan.nonzero().tolist()}, " \
                                          f"expected at {exp_nan.nonzero().tolist()}"
    keep = ~exp_nan
    assert_close(actual.detach().cpu()[keep], expected.detach().cpu()[keep], dtype, what)


def _grads_nan(fn, inputs, grad_out, as_ref):
    leaves = [(t.detach().double() if as_ref else t.detach().clone()).requires_grad_()
              if t.is_floating_point() else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = [g.double() if as_ref else g for g in grad_out]
    torch.autograd.backward(outs, gs)
    return [o.detach() for o in outs], [t.grad if t.is_floating_point() else None for t in leaves]


def check_invalid_rule(fn_kernel, fn_ref, inputs, grad_out, dtype=torch.float32):
    """Kernel (ids unchecked) against the reference: NaN where the reference says, equal
    elsewhere, and gradients that are finite (no NaN leaks from the invalid rows)."""
    outs, grads = _grads_nan(fn_kernel, inputs, grad_out, as_ref=False)
    ref_outs, ref_grads = _grads_nan(fn_ref, inputs, grad_out, as_ref=True)
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        assert_close_nan(a, e, dtype, f"output {i}")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        if a is not None:
            assert_close_nan(a, e if e is not None else torch.zeros_like(a), dtype, f"grad {i}")
    return outs, grads


def test_generate_invalid_ids_give_nan_rows_and_no_gradient():
    pooled, _, args = _small_problem(torch.float32)
    ids = torch.tensor([2, 7, -1, -5])  # N = 3: rows 1 and 3 are invalid
    outs, grads = check_invalid_rule(
        lambda p, *a: pedro_ext.generate(p, ids, *a, check_ids=False),
        lambda p, *a: ref.generate(p, ids, *a), [pooled, *args], [torch.randn(4, 5)])
    v = outs[0]
    assert torch.isnan(v[[1, 3]]).all() and torch.equal(v[2], torch.ones(5))
    assert torch.all(grads[0][[1, 2, 3]] == 0) and grads[0][0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.all(g[[0, 1]] == 0) and g[2].abs().sum() > 0  # only adapter 2 is used


@pytest.mark.parametrize("op", ["modulate", "act_mul_modulate"])
def test_modulate_invalid_seq_ids_give_nan_rows_and_no_gradient(op):
    seq = torch.tensor([1, 4, 0, -1, 1, 2])  # B = 3: rows 1 and 3 are invalid
    v = torch.randn(3, 7)
    x, u = torch.randn(6, 7), torch.randn(6, 7)
    if op == "modulate":
        fk = lambda x, v: pedro_ext.modulate(x, v, seq, check_ids=False)  # noqa: E731
        fr = lambda x, v: ref.modulate(x, v, seq)  # noqa: E731
        inputs = [x, v]
    else:
        fk = lambda g, u, v: pedro_ext.act_mul_modulate(g, u, v, seq, check_ids=False)  # noqa: E731
        fr = lambda g, u, v: ref.act_mul_modulate(g, u, v, seq)  # noqa: E731
        inputs = [x, u, v]
    outs, grads = check_invalid_rule(fk, fr, inputs, [torch.randn(6, 7)])
    assert torch.isnan(outs[0][[1, 3]]).all() and not torch.isnan(outs[0][[0, 2, 4, 5]]).any()
    for g in grads[:-1]:
        assert torch.all(g[[1, 3]] == 0)  # the constant rows pass no gradient to x / gate / up
    y = x.clone()
    pedro_ext.modulate_(y, v, seq, check_ids=False)
    assert torch.equal(torch.isnan(y), torch.isnan(ref.modulate(x, v, seq)))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_generate_and_modulate_invalid_ids_follow_the_rule(layout):
    pooled, _, args = _small_problem(torch.float32)
    ids = torch.tensor([2, 9, -1, 0])  # request 1 has an invalid adapter
    if layout == "packed":
        seq = torch.tensor([0, 3, 4, 1, 2, -2, 0, 1])  # rows 2 and 5 have invalid seq ids
        x = torch.randn(8, 5)
    else:
        seq, x = None, torch.randn(4, 3, 5)
    fk = lambda x, p, *a: pedro_ext.generate_and_modulate(x, p, ids, *a, seq_ids=seq,  # noqa: E731
                                                          check_ids=False)
    fr = lambda x, p, *a: ref.generate_and_modulate(x, seq, p, ids, *a)  # noqa: E731
    outs, grads = check_invalid_rule(fk, fr, [x, pooled, *args],
                                     [torch.randn(x.shape), torch.randn(4, 5)])
    assert torch.isnan(outs[1][1]).all()
    if layout == "packed":
        assert torch.isnan(outs[0][[2, 3, 5, 7]]).all()  # invalid seq ids, and rows of request 1
        assert torch.all(grads[0][[2, 5]] == 0)


def test_backward_ops_accept_invalid_ids_without_raising():
    pooled, _, args = _small_problem(torch.float32)
    ids = torch.tensor([2, 7, -1, -5])
    g = torch.ops.pedro_ext.generate_backward(torch.randn(4, 5), pooled, ids, *args[:5])
    assert torch.all(g[0][[1, 2, 3]] == 0)
    gv = torch.ops.pedro_ext.modulate_backward_vectors(torch.ones(3, 2), torch.ones(3, 2),
                                                       torch.tensor([0, 5, 0]), 2)
    assert torch.equal(gv, torch.tensor([[2., 2.], [0., 0.]]))


CHECKED_CALLS = [
    ("adapter_ids values must lie in [-1, 3), got values from -1 to 3",
     lambda: pedro_ext.generate(*_replace(1, torch.tensor([0, 3, -1, 1])))),
    ("seq_ids values must lie in [0, 4), got values from 0 to 4",
     lambda: pedro_ext.generate_and_modulate(torch.randn(3, 5), *_gen_args(), seq_ids=torch.tensor([0, 4, 1]))),
    ("adapter_ids values must lie in [-1, 3)",
     lambda: pedro_ext.generate_and_modulate(torch.randn(3, 5), *_replace(1, torch.tensor([0, -2, 1, 1])),
                                             seq_ids=torch.tensor([0, 2, 1]))),
    ("seq_ids values must lie in [0, 4)", lambda: pedro_ext.modulate_(torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, 4, 1]))),
    ("seq_ids values must lie in [0, 4)",
     lambda: pedro_ext.act_mul_modulate(torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 5), torch.tensor([-1, 0, 1]))),
]


@pytest.mark.parametrize("message,fn", CHECKED_CALLS, ids=[f"{i}" for i in range(len(CHECKED_CALLS))])
def test_checked_ids_raise_index_error(message, fn):
    import re
    with pytest.raises(IndexError, match=re.escape(message)):
        fn()


def test_generate_backward_checks_the_device_of_grad():
    """Issue 8 item 3: a grad on another device is refused, not read as a pointer. The CPU
    kernel is called directly (the check is shared with the CUDA kernel), and the fake kernel
    is reached by the dispatcher."""
    pooled, ids, args = _small_problem(torch.float32)
    op = torch.ops.pedro_ext.generate_backward.default
    grad = torch.randn(4, 5, device="meta")
    with pytest.raises(ValueError, match="grad is on meta but pooled is on cpu"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), grad, pooled, ids, *args[:5])
    with pytest.raises(ValueError, match="grad is on meta but pooled is on cpu"):
        op(grad, pooled, ids, *args[:5])
    with pytest.raises(ValueError, match=r"grad must be \[B, D\] = \[4, 5\]"):
        op(torch.randn(4, 6), pooled, ids, *args[:5])


# ----------------------------------------------------------------------- fake kernels check
FAKE_CASES = [(m, a) for m, a in BAD_GENERATE if "values must lie" not in m and "meta" not in m]


@pytest.mark.parametrize("message,args", FAKE_CASES, ids=[m for m, _ in FAKE_CASES])
def test_fake_generate_checks_like_the_kernel(message, args):
    import re
    meta = [a.to("meta") for a in args]
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        pedro_ext.generate(*meta)


FAKE_MODULATE = [
    ("x.size(2) is the vector width D", lambda d: pedro_ext.modulate(torch.randn(4, 2, 6, device=d), torch.randn(4, 5, device=d))),
    ("vectors has dtype", lambda d: pedro_ext.modulate_(torch.randn(4, 2, 5, device=d), torch.randn(4, 5, dtype=torch.float16, device=d))),
    ("seq_ids must be 1-D of length 3", lambda d: pedro_ext.modulate(torch.randn(3, 5, device=d), torch.randn(4, 5, device=d), torch.tensor([0, 1], device=d))),
    ("up must have the shape of gate", lambda d: pedro_ext.act_mul_modulate(torch.randn(3, 5, device=d), torch.randn(3, 4, device=d), torch.randn(4, 5, device=d), torch.zeros(3, dtype=torch.long, device=d))),
    ("activation must be 'silu' or 'gelu_tanh', got 'relu'", lambda d: pedro_ext.act_mul_modulate(torch.randn(4, 2, 5, device=d), torch.randn(4, 2, 5, device=d), torch.randn(4, 5, device=d), activation="relu")),
    ("gate must be float32, float16, bfloat16 or float64", lambda d: pedro_ext.act_mul_modulate(torch.ones(4, 2, 5, dtype=torch.int32, device=d), torch.ones(4, 2, 5, dtype=torch.int32, device=d), torch.randn(4, 5, device=d))),
    ("rat_den must be 1-D", lambda d: pedro_ext.rational(torch.randn(3, device=d), torch.randn(2, device=d), torch.randn(2, 2, device=d))),
    ("x.size(0) is the number of sequences B", lambda d: pedro_ext.generate_and_modulate(torch.randn(5, 2, 5, device=d), *[a.to(d) for a in _gen_args()])),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("message,fn", FAKE_MODULATE, ids=[m for m, _ in FAKE_MODULATE])
def test_fake_and_real_kernels_raise_the_same_error(message, fn, device):
    import re
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        fn(device)


def test_torch_compile_reports_bad_shapes_at_trace_time():
    def f(x, v):
        return pedro_ext.modulate(x, v) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"pedro_ext\.modulate: x\.size\(2\) is the vector width D"):
        compiled(torch.randn(4, 2, 6), torch.randn(4, 5))


# ----------------------------------------------------------------------- modulate_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed", "strided"])
def test_modulate_inplace_matches_modulate(dtype, layout):
    g = torch.Generator().manual_seed(8)
    wide_v = torch.randn(5, 40, generator=g).to(dtype)
    v = wide_v[:, 3:35]  # a column slice, like l_q
    seq = None
    if layout == "packed":
        seq = torch.randint(0, 5, (11,), generator=g)
        base = torch.randn(11, 32, generator=g).to(dtype)
    elif layout == "padded":
        base = torch.randn(5, 3, 32, generator=g).to(dtype)
    else:  # rows of a fused projection: evenly strided, not contiguous
        base = torch.randn(5, 3, 96, generator=g).to(dtype)[..., 32:64]
    expected = pedro_ext.modulate(base, v, seq)
    x = base.clone() if layout != "strided" else base
    version = x._version
    out = pedro_ext.modulate_(x, v, seq)
    assert out is x and x._version > version
    assert torch.equal(x, expected)


def test_modulate_inplace_handles_unevenly_strided_rows():
    x = torch.randn(4, 6, 10).transpose(0, 1)[:, :, 2:7]  # [6, 4, 5], rows not evenly spaced
    v = torch.randn(6, 5)
    expected = x * v[:, None, :]
    pedro_ext.modulate_(x, v)
    assert torch.equal(x, expected)


def test_modulate_inplace_refuses_autograd():
    x = torch.randn(2, 3, 4, requires_grad=True)
    v = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="pedro_ext.modulate_: the in-place op has no autograd"):
        pedro_ext.modulate_(x.clone(), v.requires_grad_())
    with torch.no_grad():
        y = x.clone()
        pedro_ext.modulate_(y, v)
    assert torch.equal(y, pedro_ext.modulate(x, v).detach())
    with torch.inference_mode():
        z = torch.randn(2, 3, 4)
        assert torch.equal(pedro_ext.modulate_(z.clone(), v), z * v[:, None])


def test_modulate_inplace_memory_rules():
    check_modulate_inplace_memory_rules("cpu")


def test_modulate_reads_strided_rows_without_copy():
    fused = torch.randn(3, 4, 30)
    x = fused[..., 10:20]
    v = torch.randn(3, 10)
    assert torch.equal(pedro_ext.modulate(x, v), x * v[:, None])


# ----------------------------------------------------------------------- act_mul_modulate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed", "fused_gate_up"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_modulate_matches_reference(dtype, layout, activation):
    g = torch.Generator().manual_seed(9)
    b, t, big_d = 4, 5, 37
    v = (torch.randn(b, big_d + 6, generator=g) * 0.5 + 1).to(dtype)[:, 2:2 + big_d]
    seq = None
    if layout == "packed":
        seq = torch.randint(0, b, (13,), generator=g)
        gate = (torch.randn(13, big_d, generator=g) * 3).to(dtype)
        up = torch.randn(13, big_d, generator=g).to(dtype)
    elif layout == "padded":
        gate = (torch.randn(b, t, big_d, generator=g) * 3).to(dtype)
        up = torch.randn(b, t, big_d, generator=g).to(dtype)
    else:  # gate and up as the two halves of one fused projection (Phi-3 style)
        gate_up = (torch.randn(b, t, 2 * big_d, generator=g) * 3).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
    grad = torch.randn(gate.shape, generator=g).to(dtype)
    fk = lambda gg, uu, vv: pedro_ext.act_mul_modulate(gg, uu, vv, seq, activation)  # noqa: E731
    fr = lambda gg, uu, vv: ref.act_mul_modulate(gg, uu, vv, seq, activation)  # noqa: E731
    out, grads = kernel_grads(fk, [gate, up, v], grad)
    exp, exp_grads = ref_grads(fr, [gate, up, v], grad)
    assert_close(out, exp, dtype, "act_mul_modulate")
    for name, a, e in zip(["gate", "up", "vectors"], grads, exp_grads):
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_modulate_is_eager_torch_bitwise(dtype, activation):
    """Vectors of ones give the bare MLP's act(gate) * up exactly (a fresh adapter and base-model
    rows change nothing); other vectors give eager torch's (act(gate) * up) * v."""
    act = ref.activation_fn(activation)
    for layout, gate, up, seq, b in act_mul_layouts(dtype, "cpu"):
        d = gate.shape[-1]
        ones = torch.ones(b, d, dtype=dtype)
        assert_bitwise(pedro_ext.act_mul_modulate(gate, up, ones, seq, activation), act(gate) * up,
                       f"{layout}, ones")
        v = (torch.randn(b, d + 3) * 0.5 + 1).to(dtype)[:, 1:1 + d]
        rows = v[:, None] if seq is None else v[seq]
        assert_bitwise(pedro_ext.act_mul_modulate(gate, up, v, seq, activation),
                       act(gate) * up * rows, f"{layout}, random vectors")


def test_act_mul_modulate_equals_the_unfused_path_in_float64():
    gate, up = torch.randn(3, 4, 9, dtype=torch.float64) * 4, torch.randn(3, 4, 9, dtype=torch.float64)
    v = torch.randn(3, 9, dtype=torch.float64)
    for name, act in [("silu", torch.nn.functional.silu),
                      ("gelu_tanh", lambda z: torch.nn.functional.gelu(z, approximate="tanh"))]:
        torch.testing.assert_close(pedro_ext.act_mul_modulate(gate, up, v, activation=name),
                                   act(gate) * up * v[:, None], rtol=1e-13, atol=1e-13)


def test_act_mul_modulate_extreme_gate_values():
    gate = torch.tensor([[[-1e4, -100., -20., -1e-30, 0., 1e-30, 20., 100., 1e4, float("nan")]]])
    up, v = torch.ones_like(gate), torch.ones(1, 10)
    for name in ["silu", "gelu_tanh"]:
        got = pedro_ext.act_mul_modulate(gate, up, v, activation=name)
        exp = ref.act_mul_modulate(gate.double(), up.double(), v.double(), activation=name)
        assert torch.equal(torch.isnan(got), torch.isnan(exp))
        torch.testing.assert_close(got[~torch.isnan(got)].double(), exp[~torch.isnan(exp)],
                                   rtol=1e-5, atol=1e-30)


def test_gradcheck_act_mul_modulate():
    gate = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for act in ["silu", "gelu_tanh"]:
        assert torch.autograd.gradcheck(lambda g, u, w: pedro_ext.act_mul_modulate(g, u, w, activation=act),
                                        (gate, up, v))
        seq = torch.tensor([2, 0, 2, 1, 2])
        assert torch.autograd.gradcheck(
            lambda g, u, w: pedro_ext.act_mul_modulate(g, u, w, seq, act),
            (gate[0, :, :].detach().repeat(3, 1)[:5].requires_grad_(),
             up[1].detach().repeat(3, 1)[:5].requires_grad_(), v))


def test_act_mul_modulate_backward_is_deterministic():
    g = torch.Generator().manual_seed(10)
    gate, up = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)
    v = torch.randn(3, 64, generator=g)
    seq = torch.randint(0, 3, (300,), generator=g)
    grad = torch.randn(300, 64, generator=g)
    runs = [kernel_grads(lambda a, b, c: pedro_ext.act_mul_modulate(a, b, c, seq), [gate, up, v], grad)[1]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_new_ops():
    gate, up = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    v = torch.randn(2, 8, requires_grad=True)

    def train_step(gate, up, v):
        return pedro_ext.act_mul_modulate(gate, up, v, activation="gelu_tanh").sum()

    loss = torch.compile(train_step, backend="aot_eager", fullgraph=True)(gate, up, v)
    loss.backward()
    g_compiled = v.grad.clone()
    v.grad = None
    train_step(gate, up, v).backward()
    torch.testing.assert_close(g_compiled, v.grad)

    def decode_step(x, v):
        pedro_ext.modulate_(x, v, check_ids=False)
        return x + 1

    with torch.no_grad():
        x = torch.randn(2, 1, 8)
        got = torch.compile(decode_step, backend="aot_eager", fullgraph=True)(x.clone(), v)
        assert torch.equal(got, x * v[:, None] + 1)


def test_per_token_ops_record_autograd_only_when_needed():
    x = torch.randn(2, 3, 4, requires_grad=True)
    v = torch.randn(2, 4)
    for fn in (lambda: pedro_ext.modulate(x, v), lambda: pedro_ext.act_mul_modulate(x, x, v)):
        assert fn().grad_fn is not None
        with torch.no_grad():
            assert not fn().requires_grad
        assert fn().detach().grad_fn is None
    plain = pedro_ext.modulate(x.detach(), v)
    assert not plain.requires_grad and torch.equal(plain, (x * v[:, None]).detach())


def test_second_derivatives_raise_instead_of_giving_zeros():
    """The backward ops have no derivatives of their own: a backward with create_graph=True
    (a gradient penalty, gradgradcheck) raises rather than returning zero second derivatives."""
    pooled, ids, args = _small_problem()
    leaves = [a.clone().requires_grad_() for a in [pooled, *args]]
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor([3, 0, 0, 2, 3, 1, 3])
    z = torch.randn(20, dtype=torch.float64, requires_grad=True)
    num, den = (torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (6, 4))
    cases = {
        "rational": (lambda: pedro_ext.rational(z, num, den), [z, num, den]),
        "generate": (lambda: pedro_ext.generate(leaves[0], ids, *leaves[1:]), leaves),
        "generate_and_modulate": (lambda: pedro_ext.generate_and_modulate(
            xs, leaves[0], ids, *leaves[1:], seq_ids=seq % 4)[0], [xs, *leaves]),
        "modulate": (lambda: pedro_ext.modulate(x, v), [x, v]),
        "act_mul_modulate": (lambda: pedro_ext.act_mul_modulate(x, x * 2, v), [x, v]),
    }
    for op, (fn, inputs) in cases.items():
        first = torch.autograd.grad(fn().sum(), inputs)  # first order: as before
        assert all(g is not None for g in first), op
        with pytest.raises(RuntimeError, match=f"pedro_ext.{op}: second derivatives are not "
                                                "implemented"):
            torch.autograd.grad(fn().sum(), inputs, create_graph=True)
