"""Rational-activation coefficients: GELU fits at degrees (5, 4), identity, and a fitter for
other degrees."""
import functools
import math
from typing import Tuple

import torch

from .reference import rational_eval

# The default initialisation: a (5, 4) fit of GELU on [-8, 8], made once with
# fit_gelu(5, 4, stored=False) below (linearised least squares, then L-BFGS on the mean squared error
# and on L_p norms of the error up to p = 64, i.e. close to minimax; float64, 2001 points).
# Max abs error 3.4e-3 on [-8, 8]. Outside that range the unit stays GELU-shaped:
# R(x) = x / 2 + E(x) with E even and rising monotonically to c4 / d4 = 11.0, so (checked up to
# |x| = 1e6) x / 2 + 4 <= R(x) <= x + 0.002 for x >= 8 (R(12) = 11.81, R(16) = 15.19) and
# x / 2 + 4 <= R(x) <= 0.002 for x <= -8 (R(-12) = -0.19, R(-16) = -0.81). Far out both tails
# grow like x / 2 + 11: a (5, 4) rational with the |.| denominator has one asymptotic slope on
# both sides, so no coefficients make it ~x on one side and ~0 on the other for every x.
GELU_WIDE_NUM = (-3.3764514e-3, 0.5, 0.418938023, 0.125258196, 0.0158627119, 7.20449807e-4)
GELU_WIDE_DEN = (1.70565847e-10, 0.250516392, 1.88357479e-11, 1.44089961e-3)
GELU_WIDE_RANGE = (-8.0, 8.0)

# The reference notes' (5, 4) fit on [-3, 3]: max abs error 9.5e-4 there, but wrong in sign
# beyond it (R(8) = -4.9, R(-8) = +2.4). Kept as realistic coefficients for the op tests.
GELU_NUM = (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140)
GELU_DEN = (4.95854e-5, 0.14729774, 1.16458e-5, -0.00748387)


def gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))


def _lp_norm(e: torch.Tensor, p: int) -> torch.Tensor:
    """(mean |e|^p)^(1/p) without overflow or underflow: scaled by max |e| (a constant factor,
    so the value and its gradient are the norm's)."""
    a = e.abs()
    m = a.max().detach().clamp_min(1e-300)
    return m * ((a / m) ** p).mean() ** (1.0 / p)


def _minimise(params, loss) -> None:
    """L-BFGS on loss() over params (leaf tensors), in place; the result is kept only if its
    loss is finite and no higher than at the start (a line search that strays to a huge trial
    point can otherwise leave inf / NaN parameters), else params are restored."""
    with torch.no_grad():
        start, before = [p.clone() for p in params], loss()
    opt = torch.optim.LBFGS(params, max_iter=300, tolerance_grad=1e-16, tolerance_change=1e-20,
                            history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        after = loss()
        if not (torch.isfinite(after) and after <= before):
            for p, s in zip(params, start):
                p.copy_(s)


@functools.lru_cache(maxsize=None)
def fit_gelu(num_degree: int, den_degree: int, lo: float = GELU_WIDE_RANGE[0],
             hi: float = GELU_WIDE_RANGE[1], stored: bool = True
             ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Coefficients (c0..cm, d1..dn) of a rational fit of GELU on [lo, hi].

    (5, 4) on [-8, 8] returns the stored GELU_WIDE_* (unless stored=False). Otherwise: linear
    least squares for P(z) - gelu(z) * A(z) = gelu(z) (the denominator without its |.|), then
    L-BFGS on the squared error of the safe form, then on L_p norms of the error for growing p
    (towards the smallest maximum error). Each stage keeps its result only if it is finite and
    lowers that stage's loss, so a line search that strays (a huge trial error) cannot leave
    NaN coefficients. float64 throughout; deterministic for a given torch build and thread
    count (BLAS reductions may round differently with another thread count)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"fit_gelu: the fit range needs finite lo < hi, got [{lo}, {hi}]")
    if stored and (num_degree, den_degree, lo, hi) == (5, 4, *GELU_WIDE_RANGE):
        return GELU_WIDE_NUM, GELU_WIDE_DEN
    z = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    f = gelu(z)
    cols = [z ** j for j in range(num_degree + 1)] + [-f * z ** k for k in range(1, den_degree + 1)]
    sol = torch.linalg.lstsq(torch.stack(cols, 1), f.unsqueeze(1)).solution.squeeze(1)
    num = sol[: num_degree + 1].clone().requires_grad_()
    den = sol[num_degree + 1:].clone().requires_grad_()

    def minimise(loss_fn):
        _minimise([num, den], lambda: loss_fn(rational_eval(z, num, den) - f))

    minimise(lambda e: (e ** 2).mean())
    for p in (4, 8, 16, 32, 64):
        # (in units of 1e-3, the size of a good fit's error: L-BFGS's tolerances suit O(1) losses)
        minimise(lambda e: _lp_norm(e / 1e-3, p))
    if not all(math.isfinite(c) for c in num.tolist() + den.tolist()):
        raise RuntimeError(f"fit_gelu({num_degree}, {den_degree}, {lo}, {hi}) found no finite fit")
    return tuple(num.detach().tolist()), tuple(den.detach().tolist())


def rational_init(kind: str, num_degree: int, den_degree: int):
    """(num, den) float64 tensors for an initial rational activation: 'gelu' (a fit on
    [-8, 8]) or 'identity'."""
    if kind == "gelu":
        num, den = fit_gelu(num_degree, den_degree)
        return torch.tensor(num, dtype=torch.float64), torch.tensor(den, dtype=torch.float64)
    if kind == "identity":
        if num_degree < 1:
            raise ValueError("rational_init='identity' needs a numerator of degree >= 1")
        num = torch.zeros(num_degree + 1, dtype=torch.float64)
        num[1] = 1
        return num, torch.zeros(den_degree, dtype=torch.float64)
    raise ValueError(f"rational_init must be 'gelu' or 'identity', got {kind!r}")
