"""Start-up and admission checks of the PEDRO vLLM model, both in the process that receives the
requests: engine settings PEDRO cannot serve are refused before the engine starts, and a request
naming an adapter the bank lacks is refused on its own (HTTP 400), the engine untouched."""
import threading
from typing import List, Optional

from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.v1.sample.logits_processor import LogitsProcessor

from . import ADAPTERS_KEY, ARCHITECTURE, REQUEST_KEY
from .bank import (BASE_NAMES, ModelDims, UnknownAdapterError, check_adapter_config,
                   resolve_adapter_paths)

ADMISSION_CHECK = "pedro_ext.serving_vllm.config_check:PedroAdapterAdmission"

# The served bank's adapter names, known in the process that admits requests (the engine
# created last in this process: one PEDRO engine per process).
_served_adapters: List[str] = []
_lock = threading.Lock()


def adapter_name_of(sampling_params) -> Optional[str]:
    """The adapter a request asks for (None: base model)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    name = extra.get(REQUEST_KEY)
    if name is not None and not isinstance(name, str):
        raise ValueError(f"extra_args['{REQUEST_KEY}'] must be an adapter name (a string) or "
                         f"null, got {type(name).__name__} {name!r}")
    return name


def unsupported_settings(vllm_config) -> List[str]:
    """Why this engine configuration cannot serve PEDRO (empty: it can)."""
    sched, cache, par = (vllm_config.scheduler_config, vllm_config.cache_config,
                         vllm_config.parallel_config)
    problems = []
    if sched.enable_chunked_prefill:
        problems.append("chunked prefill is on (pass enable_chunked_prefill=False / "
                        "--no-enable-chunked-prefill): PEDRO pools the whole prompt at once")
    if cache.enable_prefix_caching:
        problems.append("prefix caching is on (pass enable_prefix_caching=False / "
                        "--no-enable-prefix-caching): a cached prefix skips the prompt tokens "
                        "PEDRO pools, and the cached K/V were computed with another request's "
                        "V vectors")
    if getattr(sched, "long_prefill_token_threshold", 0):
        problems.append("long_prefill_token_threshold > 0 splits long prompts")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if vllm_config.lora_config is not None:
        problems.append("LoRA cannot be combined with PEDRO in one engine")
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        problems.append("tensor / pipeline parallelism is not supported (yet)")
    if getattr(sched, "async_scheduling", False):
        problems.append("async scheduling is not supported (pass async_scheduling=False / "
                        "--no-async-scheduling)")
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu")
    if device != "cpu" and not vllm_config.model_config.enforce_eager:
        problems.append(f"CUDA graphs on {device} are not supported yet (pass enforce_eager=True "
                        "/ --enforce-eager): the vector refresh reads each step's plan on the "
                        "host, which a captured graph would freeze")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("the V2 model runner is not supported (unset VLLM_USE_V2_MODEL_RUNNER)")
    return problems


class PedroEngineCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook for PedroLlamaForCausalLM: refuse settings PEDRO
    cannot serve, check every adapter's config against the model, and register the admission
    check that validates each request's adapter name."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        problems = unsupported_settings(vllm_config)
        if problems:
            raise ValueError("PEDRO (PedroLlamaForCausalLM) cannot run with these engine "
                             "settings:\n  - " + "\n  - ".join(problems))
        model_config = vllm_config.model_config
        spec = getattr(model_config.hf_config, ADAPTERS_KEY, None)
        if spec is None:
            raise ValueError(f"{ARCHITECTURE} needs its adapters: hf_overrides="
                             f'{{"architectures": ["{ARCHITECTURE}"], "{ADAPTERS_KEY}": '
                             '<folder written by PedroModel.save_pretrained, or {name: folder}>}')
        dims = ModelDims.from_hf_config(model_config.hf_config)
        paths = resolve_adapter_paths(spec)
        for name, path in paths.items():
            check_adapter_config(name, path, dims)
        with _lock:
            _served_adapters[:] = list(paths)
        procs = list(model_config.logits_processors or [])
        if ADMISSION_CHECK not in procs:
            model_config.logits_processors = procs + [ADMISSION_CHECK]


class PedroAdapterAdmission(LogitsProcessor):
    """Validates extra_args['pedro_adapter'] when a request is admitted; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        name = adapter_name_of(sampling_params)
        if name in BASE_NAMES:
            return
        with _lock:
            known = list(_served_adapters)
        if not known:
            raise ValueError("PEDRO: this process has no adapter bank registered (the engine "
                             "must be created here, with a single API server)")
        if name not in known:
            raise UnknownAdapterError(name, known)

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def apply(self, logits):
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
