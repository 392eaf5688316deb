"""Benchmarks of PEDRO against LoRA in single-backbone multi-tenant serving:
`python -m pedro_ext.bench` (see --help)."""
from .presets import PRESETS, Preset
from .runner import run

__all__ = ["PRESETS", "Preset", "run"]
