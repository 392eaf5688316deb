"""Rational-activation coefficients: the (5, 4) GELU fit from the reference notes, identity, and
a fitter for other degrees."""
import functools
import math
from typing import Tuple

import torch

from .reference import rational_eval

# R(z) = (c0 + ... + c5 z^5) / (1 + |d1 z + ... + d4 z^4|); max abs error 9.5e-4 on [-3, 3].
GELU_NUM = (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140)
GELU_DEN = (4.95854e-5, 0.14729774, 1.16458e-5, -0.00748387)


def gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))


@functools.lru_cache(maxsize=None)
def fit_gelu(num_degree: int, den_degree: int, lo: float = -3.0, hi: float = 3.0
             ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Coefficients (c0..cm, d1..dn) of a rational fit of GELU on [lo, hi].

    (5, 4) returns the published fit. Other degrees: linear least squares for
    P(z) - gelu(z) * A(z) = gelu(z) (the denominator without its |.|), then L-BFGS on the
    squared error of the safe form. Deterministic; float64 throughout."""
    if (num_degree, den_degree) == (5, 4):
        return GELU_NUM, GELU_DEN
    z = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    f = gelu(z)
    cols = [z ** j for j in range(num_degree + 1)] + [-f * z ** k for k in range(1, den_degree + 1)]
    sol = torch.linalg.lstsq(torch.stack(cols, 1), f.unsqueeze(1)).solution.squeeze(1)
    num = sol[: num_degree + 1].clone().requires_grad_()
    den = sol[num_degree + 1:].clone().requires_grad_()
    opt = torch.optim.LBFGS([num, den], max_iter=500, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((rational_eval(z, num, den) - f) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(num.detach().tolist()), tuple(den.detach().tolist())


def rational_init(kind: str, num_degree: int, den_degree: int):
    """(num, den) float64 tensors for an initial rational activation: 'gelu' or 'identity'."""
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
