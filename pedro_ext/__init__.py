"""pedro_ext: CPU and CUDA kernels for PEDRO (prompt-dependent representation modification)."""
from ._build import build_info, set_cuda_index_checks
from .ops import generate, generate_and_modulate, modulate, rational
from . import reference

__all__ = ["build_info", "set_cuda_index_checks", "generate", "generate_and_modulate",
           "modulate", "rational", "reference"]
