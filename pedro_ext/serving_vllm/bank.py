"""The adapter bank a PEDRO vLLM model serves: folders written by PedroModel.save_pretrained,
checked against the base model and stacked per decoder layer into the [N, ...] tensors that
pedro_ext.generate gathers from. Needs no vLLM (the checks run before an engine starts)."""
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ..config import (CONFIG_NAME, POOL_NORMS, POOLING_MODES, WEIGHTS_NAME, PedroConfig,
                      check_adapter_tensors)

# The layout the serving model applies: the generator's output is [l_q | l_v | l_u].
SERVED_TARGETS = ["q_proj", "v_proj", "up_proj"]
BASE_NAMES = (None, "__base__")
POOLING_CODES = {mode: code for code, mode in enumerate(POOLING_MODES)}
NORM_CODES = {mode: code for code, mode in enumerate(POOL_NORMS)}
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_KEY_RE = re.compile(r"^layers\.(\d+)\.(w_down|b_down|rat_num|rat_den|w_up|b_up|att_query|norm_weight|norm_bias)$")


@dataclass(frozen=True)
class ModelDims:
    """What an adapter must fit: the base model's sizes (unsharded)."""
    hidden_size: int
    num_layers: int
    q_size: int  # q_proj output width (heads * head_dim)
    kv_size: int  # v_proj output width (kv heads * head_dim)
    intermediate_size: int

    @property
    def vector_size(self) -> int:
        return self.q_size + self.kv_size + self.intermediate_size

    @classmethod
    def from_hf_config(cls, config) -> "ModelDims":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.hidden_size, config.num_hidden_layers, heads * head_dim,
                   kv_heads * head_dim, config.intermediate_size)


def resolve_adapter_paths(spec: Union[str, Mapping[str, str]]) -> Dict[str, str]:
    """{adapter name: folder}. spec is such a mapping, or one folder written by
    PedroModel.save_pretrained: its top level is the adapter "default" (if it has one) and
    each sub-folder holding an adapter_config.json is the adapter named after it."""
    if isinstance(spec, str):
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"pedro_adapters: {spec!r} is not a folder")
        paths = {}
        if os.path.isfile(os.path.join(spec, CONFIG_NAME)):
            paths["default"] = spec
        for entry in sorted(os.listdir(spec)):
            sub = os.path.join(spec, entry)
            if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
                paths[entry] = sub
        if not paths:
            raise ValueError(f"pedro_adapters: {spec!r} holds no {CONFIG_NAME}, at its top "
                             "level or in a sub-folder (expected PedroModel.save_pretrained's "
                             "layout)")
    elif isinstance(spec, Mapping):
        paths = dict(spec)
        if not paths:
            raise ValueError("pedro_adapters is empty: give at least one adapter")
    else:
        raise TypeError(f"pedro_adapters must be a folder or a {{name: folder}} mapping, got "
                        f"{type(spec).__name__}")
    for name, path in paths.items():
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "__base__":
            raise ValueError(f"pedro_adapters: adapter name must be letters, digits, '_' or "
                             f"'-' (and not '__base__'), got {name!r}")
        if not isinstance(path, str) or not os.path.isdir(path):
            raise FileNotFoundError(f"pedro_adapters[{name!r}]: {path!r} is not a folder")
    return paths


def check_adapter_config(name: str, path: str, dims: ModelDims) -> PedroConfig:
    """The adapter's PedroConfig, if it fits a model of these sizes; else a ValueError that
    names the adapter, its file and the mismatch."""
    where = f"adapter {name!r} ({os.path.join(path, CONFIG_NAME)})"
    try:
        config = PedroConfig.from_pretrained(path)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if config.target_modules is not None and list(config.target_modules) != SERVED_TARGETS:
        raise ValueError(f"{where} targets {config.target_modules}; the vLLM PEDRO model serves "
                         f"adapters of {SERVED_TARGETS} only")
    for key, have in (("hidden_size", dims.hidden_size), ("num_layers", dims.num_layers)):
        want = getattr(config, key)
        if want is not None and want != have:
            raise ValueError(f"{where} was made for a model with {key}={want}; the served "
                             f"model has {key}={have}")
    layers = config.layers_to_transform
    if layers is not None and any(not 0 <= i < dims.num_layers for i in layers):
        raise ValueError(f"{where}: layers_to_transform={layers} lies outside the model's "
                         f"{dims.num_layers} layers")
    return config


def _load_weights(name: str, path: str, config: PedroConfig, dims: ModelDims
                  ) -> Dict[int, Dict[str, torch.Tensor]]:
    """{layer: {key: tensor}} of one adapter, every shape checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"adapter {name!r}: no {WEIGHTS_NAME} in {path!r}")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"adapter {name!r}: {file} is not a readable safetensors file: "
                         f"{exc}") from exc
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise ValueError(f"adapter {name!r}: {file} has an unexpected tensor {key!r}")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    expected = set(config.layers_to_transform if config.layers_to_transform is not None
                   else range(dims.num_layers))
    if set(layers) != expected:
        raise ValueError(f"adapter {name!r}: {file} holds layers {sorted(layers)}, its config "
                         f"says {sorted(expected)}")
    m, n = config.rational_degrees
    d, big_d, r = dims.hidden_size, dims.vector_size, config.r
    shapes = {"w_down": (d, r), "b_down": (r,), "rat_num": (m + 1,), "rat_den": (n,),
              "w_up": (r, big_d), "b_up": (big_d,)}
    if config.pooling == "attention":
        shapes["att_query"] = (d,)
    if config.pool_norm_affine and config.pool_norm != "none":
        shapes["norm_weight"] = (d,)
        if config.pool_norm == "layer":
            shapes["norm_bias"] = (d,)
    for idx, tensors in layers.items():
        check_adapter_tensors(tensors, shapes, f"adapter {name!r}: layer {idx} of {file}")
    return layers


class AdapterBank:
    """Every served adapter, stacked per layer (padded to the largest r and rational degrees,
    which leaves each adapter's function unchanged: padded w_up rows and coefficients are 0).
    An adapter that skips a layer (layers_to_transform) is the identity there: its w_up and
    b_up rows are 0, so its vectors are exactly 1."""

    def __init__(self, spec: Union[str, Mapping[str, str]], dims: ModelDims):
        self.dims = dims
        self.paths = resolve_adapter_paths(spec)
        self.names: List[str] = list(self.paths)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.configs = {name: check_adapter_config(name, path, dims)
                        for name, path in self.paths.items()}
        self.pooling_codes = torch.tensor(
            [POOLING_CODES[self.configs[n].pooling] for n in self.names], dtype=torch.int64)
        self.norm_codes = torch.tensor(
            [NORM_CODES[self.configs[n].pool_norm] for n in self.names], dtype=torch.int64)
        self._weights = {name: _load_weights(name, self.paths[name], self.configs[name], dims)
                         for name in self.names}

    def adapter_id(self, name: Optional[str]) -> int:
        """Bank index of an adapter name; -1 for the base model (None or '__base__')."""
        if name in BASE_NAMES:
            return -1
        if name not in self.index:
            raise UnknownAdapterError(name, self.names)
        return self.index[name]

    def release_weights(self) -> None:
        """Drop the per-adapter tensors once every layer has its stacked copy."""
        self._weights = None

    def layer_tensors(self, layer: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The stacked bank of one decoder layer: w_down [N, d, r], b_down [N, r],
        rat_num [N, m+1], rat_den [N, n], w_up [N, r, D], b_up [N, D], att_query [N, d], and
        the pooled input's affine norm_weight [N, d] (ones without one), norm_bias [N, d]."""
        if self._weights is None:
            raise RuntimeError("AdapterBank.layer_tensors after release_weights()")
        d, big_d = self.dims.hidden_size, self.dims.vector_size
        r = max(c.r for c in self.configs.values())
        num_len = max(c.rational_degrees[0] + 1 for c in self.configs.values())
        den_len = max(c.rational_degrees[1] for c in self.configs.values())
        rows = {k: [] for k in ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up",
                                "att_query", "norm_weight", "norm_bias")}
        for name in self.names:
            config = self.configs[name]
            t = self._weights[name].get(layer)
            if t is None:  # the adapter leaves this layer alone: vectors of exactly 1
                t = {"w_down": torch.zeros(d, config.r), "b_down": torch.zeros(config.r),
                     "rat_num": torch.zeros(config.rational_degrees[0] + 1),
                     "rat_den": torch.zeros(config.rational_degrees[1]),
                     "w_up": torch.zeros(config.r, big_d), "b_up": torch.zeros(big_d)}
            pad_r = r - t["w_down"].shape[1]
            rows["w_down"].append(F.pad(t["w_down"].float(), (0, pad_r)))
            rows["b_down"].append(F.pad(t["b_down"].float(), (0, pad_r)))
            rows["rat_num"].append(F.pad(t["rat_num"].float(), (0, num_len - t["rat_num"].numel())))
            rows["rat_den"].append(F.pad(t["rat_den"].float(), (0, den_len - t["rat_den"].numel())))
            rows["w_up"].append(F.pad(t["w_up"].float(), (0, 0, 0, pad_r)))
            rows["b_up"].append(t["b_up"].float())
            rows["att_query"].append(t["att_query"].float() if "att_query" in t
                                     else torch.zeros(d))
            rows["norm_weight"].append(t["norm_weight"].float() if "norm_weight" in t
                                       else torch.ones(d))
            rows["norm_bias"].append(t["norm_bias"].float() if "norm_bias" in t
                                     else torch.zeros(d))
        return {k: torch.stack(v).to(dtype) for k, v in rows.items()}


class UnknownAdapterError(ValueError):
    def __init__(self, name, known: List[str]):
        shown = ", ".join(repr(n) for n in known[:20]) + (", ..." if len(known) > 20 else "")
        super().__init__(f"unknown PEDRO adapter {name!r} in extra_args['pedro_adapter']; this "
                         f"server has {len(known)} adapter(s): {shown} (omit the key, or pass "
                         "None or '__base__', for the base model)")
        self.name = name
