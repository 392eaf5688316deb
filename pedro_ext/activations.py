"""Rational-activation coefficients: the (5, 4) GELU fit from the reference notes, identity,
and a fitter for other degrees."""
import math

import torch

# R(z) = (c0 + ... + c5 z^5) / (1 + |d1 z + ... + d4 z^4|); max abs error 9.5e-4 on [-3, 3].
GELU_NUM = (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140)
GELU_DEN = (4.95854e-5, 0.14729774, 1.16458e-5, -0.00748387)


def gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
