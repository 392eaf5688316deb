"""The default rational initialisation: a (5, 4) GELU fit that is accurate on [-8, 8] and keeps
GELU's shape beyond it (the op kernels take coefficients as data, so they evaluate it as is)."""
import pytest
import torch

import pedro_ext
from pedro_ext import PedroConfig, reference
from pedro_ext.activations import (GELU_DEN, GELU_NUM, GELU_WIDE_DEN, GELU_WIDE_NUM,
                                   GELU_WIDE_RANGE, _lp_norm, _minimise, fit_gelu, gelu,
                                   rational_init)
from pedro_ext.layer import PedroAdapterWeights

F64 = dict(dtype=torch.float64)


def _wide(x):
    return pedro_ext.rational(x, torch.tensor(GELU_WIDE_NUM, **F64).to(x.dtype),
                              torch.tensor(GELU_WIDE_DEN, **F64).to(x.dtype))


def _tails_ok(num, den):
    """GELU-like tails up to |x| = 1e6: x/2 + 4 <= R(x) <= x + 0.002 for x >= 8, and
    x/2 + 4 <= R(x) <= 0.002 for x <= -8; within 6% of x on [8, 16], |R| <= 0.82 on [-16, -8]."""
    x = torch.logspace(torch.log10(torch.tensor(8.0)).item(), 6, 20001, **F64)
    num, den = torch.tensor(num, **F64), torch.tensor(den, **F64)
    pos, neg = reference.rational(x, num, den), reference.rational(-x, num, den)
    near = x <= 16
    return bool((pos >= x / 2 + 4).all() and (pos <= x + 2e-3).all()
                and (neg >= -x / 2 + 4).all() and (neg <= 2e-3).all()
                and ((pos - x).abs()[near] <= 0.06 * x[near]).all()
                and (neg.abs()[near] <= 0.82).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_gelu_fit_error_on_its_range(dtype):
    z = torch.linspace(*GELU_WIDE_RANGE, 100001, **F64)
    err = (_wide(z.to(dtype)).double() - gelu(z)).abs().max().item()
    assert err < 3.4e-3 + (1e-5 if dtype == torch.float32 else 1e-9)
    # the kernel and the pure-PyTorch reference agree on the new coefficients
    ref = reference.rational(z.to(dtype), torch.tensor(GELU_WIDE_NUM, dtype=dtype),
                             torch.tensor(GELU_WIDE_DEN, dtype=dtype))
    torch.testing.assert_close(_wide(z.to(dtype)), ref)


def test_wide_gelu_fit_has_gelu_like_tails():
    assert _tails_ok(GELU_WIDE_NUM, GELU_WIDE_DEN)
    # the check can fail: the old [-3, 3] fit turns the wrong way past its range
    assert not _tails_ok(GELU_NUM, GELU_DEN)
    x = torch.tensor([8.0, -8.0], **F64)
    old = reference.rational(x, torch.tensor(GELU_NUM, **F64), torch.tensor(GELU_DEN, **F64))
    assert old[0] < 0 < old[1]


def test_stored_coefficients_are_what_the_fit_produces():
    num, den = fit_gelu(5, 4, stored=False)  # ~3 s
    torch.testing.assert_close(torch.tensor(num, **F64), torch.tensor(GELU_WIDE_NUM, **F64),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(den, **F64), torch.tensor(GELU_WIDE_DEN, **F64),
                               rtol=1e-6, atol=1e-9)


def test_new_adapters_start_from_the_wide_fit():
    num, den = rational_init("gelu", 5, 4)
    assert num.tolist() == list(GELU_WIDE_NUM) and den.tolist() == list(GELU_WIDE_DEN)
    w = PedroAdapterWeights(PedroConfig(r=2), d=4, big_d=6)
    torch.testing.assert_close(w.rat_num.double(), num, rtol=0, atol=1e-7)
    torch.testing.assert_close(w.rat_den.double(), den, rtol=0, atol=1e-7)


def test_other_degrees_are_fitted_on_the_wide_range():
    z = torch.linspace(*GELU_WIDE_RANGE, 2001, **F64)

    def max_err(coefficients):
        num, den = (torch.tensor(c, **F64) for c in coefficients)
        return (reference.rational(z, num, den) - gelu(z)).abs().max().item()

    # (3, 2): 0.154 when fitted on [-8, 8], 1.6 there when fitted on [-3, 3]
    assert max_err(fit_gelu(3, 2)) < 0.16
    assert max_err(fit_gelu(3, 2, -3.0, 3.0)) > 1.0


def test_lp_norm_of_the_fitter_neither_overflows_nor_underflows():
    # |e| ** 64 overflows float64 for |e| > ~6e4 and underflows to 0 for |e| < ~1e-5: the old
    # (|e| / 1e-3) ** 64 overflowed once a line-search trial strayed, and left NaN coefficients
    # (seen for (6, 5) under torch 2.13 with one thread)
    big = torch.tensor([1e5, -1.0, 1e-200, 0.0], **F64, requires_grad=True)
    got = _lp_norm(big, 64)
    torch.testing.assert_close(got.detach(), torch.tensor(1e5 * 0.25 ** (1 / 64), **F64))
    (g,) = torch.autograd.grad(got, big)
    assert torch.isfinite(g).all() and g[0] > 0
    tiny = torch.tensor([3e-7, -1e-7], **F64, requires_grad=True)
    got = _lp_norm(tiny, 64)
    torch.testing.assert_close(got.detach(), torch.tensor(3e-7 * 0.5 ** (1 / 64), **F64))
    (g,) = torch.autograd.grad(got, tiny)
    assert torch.isfinite(g).all() and g[0] > 0
    e = torch.randn(50, **F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_lp_norm(e, 4), (e.abs() ** 4).mean() ** 0.25)


def test_a_minimisation_that_strays_keeps_its_start():
    # L-BFGS on this loss steps past 1.5, where it turns NaN, and ends at a huge p
    p = torch.tensor([1.0], **F64, requires_grad=True)

    def loss():
        return ((p - 3) ** 2).sum() + 0 * torch.sqrt(1.5 - p).sum()

    _minimise([p], loss)
    assert p.item() == 1.0
    q = torch.tensor([1.0], **F64, requires_grad=True)
    _minimise([q], lambda: ((q - 3) ** 2).sum())  # and a sane one is kept
    assert abs(q.item() - 3) < 1e-6


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, -2.0), (float("nan"), 3.0), (-8.0, float("inf"))])
def test_fit_gelu_refuses_a_range_that_is_not_finite_and_increasing(lo, hi):
    with pytest.raises(ValueError, match="finite lo < hi"):
        fit_gelu(3, 2, lo, hi)


def test_fit_gelu_raises_rather_than_return_a_non_finite_fit(monkeypatch):
    nan_solution = torch.full((7, 1), float("nan"), **F64)
    monkeypatch.setattr(torch.linalg, "lstsq",
                        lambda a, b: type("Solution", (), {"solution": nan_solution})())
    with pytest.raises(RuntimeError, match="no finite fit"):
        fit_gelu.__wrapped__(4, 2, -7.0, 7.0)
