"""Benchmarks of PEDRO against LoRA in single-backbone multi-tenant serving:
`python -m pedro_ext.bench` (see --help)."""
from .presets import PRESETS, Preset


def run(*args, **kwargs):
    """pedro_ext.bench.runner.run (imported on first use: it pulls in transformers and plotting)."""
    from .runner import run as _run
    return _run(*args, **kwargs)


__all__ = ["PRESETS", "Preset", "run"]
