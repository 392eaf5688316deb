"""pedro_ext: CPU and CUDA kernels for PEDRO (prompt-dependent representation modification),
and PEDRO adapters for Hugging Face causal LMs."""
from ._build import build_info, set_cuda_index_checks
from .ops import generate, generate_and_modulate, modulate, rational
from . import reference
from .config import PedroConfig
from .model import PedroModel, get_pedro_model
from . import diagnostics

__all__ = ["build_info", "set_cuda_index_checks", "generate", "generate_and_modulate",
           "modulate", "rational", "reference", "PedroConfig", "PedroModel", "get_pedro_model",
           "diagnostics"]
