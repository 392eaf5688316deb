"""PedroConfig: what a PEDRO adapter is, saved as adapter_config.json (peft's layout)."""
import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
POOLING_MODES = ("mean", "last", "max", "attention")
POOL_NORMS = ("none", "rms", "layer")
TASK_TYPES = (None, "CAUSAL_LM")

# Modules whose outputs PEDRO scales, per architecture: Q, V and the FFN up-projection.
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj", "up_proj"],
    "mistral": ["q_proj", "v_proj", "up_proj"],
    "qwen2": ["q_proj", "v_proj", "up_proj"],
    "qwen3": ["q_proj", "v_proj", "up_proj"],
}


def check_adapter_tensors(tensors: Mapping, shapes: Mapping[str, Tuple[int, ...]], where: str) -> None:
    """A ValueError naming `where` and the tensor unless `tensors` holds exactly the keys of
    `shapes`, each of its shape and finite (an adapter file read by the HF wrapper or vLLM)."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit this model: lacks {missing[:5]}, has unexpected "
                         f"{unexpected[:5]}")
    for key, shape in shapes.items():
        t = tensors[key]
        if not t.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {t.dtype}, adapter weights are floating "
                             "point")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, this model needs "
                             f"{tuple(shape)}")
        if not t.isfinite().all():
            raise ValueError(f"{where}: {key} holds non-finite values (NaN or inf); the adapter "
                             "would give NaN outputs for its requests")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class PedroConfig:
    """Configuration of one PEDRO adapter.

    r: bottleneck width of each layer's vector generator (d -> r -> D).
    pooling: how the prompt's hidden states become one vector: "mean", "last", "max" or
        "attention" (a learned query per layer: softmax over prompt positions of h . w).
    target_modules: Linear modules (name suffixes inside a decoder layer) whose outputs are
        scaled, in the order their slices sit in the generated vector. The generator reads the
        input of the first one (q_proj: the normalised hidden states). None: the architecture's
        default (Q, V, FFN up).
    rational_degrees: (m, n) of the rational activation P_m / (1 + |A_n|).
    rational_init: "gelu" (a near-minimax fit of GELU on [-8, 8], pedro_ext.activations; at
        the default degrees (5, 4) its tails are GELU-shaped, checked to |x| = 1e6; other
        degrees are fitted on [-8, 8] only and their tails are not constrained) or "identity".
    rational_trainable: whether the rational coefficients are trained at all.
    pool_norm: normalisation of the pooled vector before the down-projection: "none", "rms"
        (x / rms(x)) or "layer" ((x - mean) / std). The pooled hidden states of early layers are
        tiny (RMS ~0.03 in SmolLM2's layer 0), which leaves z = pooled @ w_down near zero where
        the rational unit is linear; a norm gives every layer's generator an input of RMS 1.
        Default "rms": in the quality study it made the vectors vary across prompts 3-4x more
        (layer 0: 10x) at equal quality. Configs saved without the key (before it existed)
        load as "none", the function they were trained with.
    pool_norm_affine: give the norm a learnable elementwise scale (and, for "layer", a shift),
        initialised at 1 (and 0). Without it the norm has no parameters.
    dropout: dropout on the pooled vector during training (each row of a mixed batch uses its
        own adapter's rate).
    init_scale: std of w_down is init_scale / sqrt(d); w_up and b_up start at zero, so a fresh
        adapter is exactly the identity whatever the other options.
    layers_to_transform: decoder-layer indices to adapt (None: all).
    task_type: as in peft configs; PEDRO adapts causal LMs: None or "CAUSAL_LM".
    modules_to_save: as in peft configs; PEDRO trains no copies of base modules, so only None
        or an empty list is accepted.
    """

    r: int = 12
    pooling: str = "mean"
    target_modules: Optional[List[str]] = None
    rational_degrees: Tuple[int, int] = (5, 4)
    rational_init: str = "gelu"
    rational_trainable: bool = True
    pool_norm: str = "rms"
    pool_norm_affine: bool = False
    dropout: float = 0.0
    init_scale: float = 1.0
    layers_to_transform: Optional[List[int]] = None
    inference_mode: bool = False
    task_type: Optional[str] = None
    modules_to_save: Optional[List[str]] = None
    base_model_name_or_path: Optional[str] = None
    peft_type: str = "PEDRO"
    # Filled in when the adapter is attached, checked when it is loaded into a model.
    model_type: Optional[str] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        degrees = self.rational_degrees
        if isinstance(degrees, (str, bytes)) or not hasattr(degrees, "__len__") or \
                len(degrees) != 2 or not all(_is_int(x) and x >= 0 for x in degrees):
            raise ValueError(f"PedroConfig.rational_degrees must be (m >= 0, n >= 0), two ints, got "
                             f"{degrees!r}")
        self.rational_degrees = tuple(int(x) for x in degrees)
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"PedroConfig.r must be a positive int, got {self.r!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"PedroConfig.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.rational_init not in ("gelu", "identity"):
            raise ValueError(f"PedroConfig.rational_init must be 'gelu' or 'identity', got {self.rational_init!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"PedroConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("rational_trainable", "pool_norm_affine", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PedroConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if _is_int(self.layers_to_transform):  # peft accepts one index
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and (
                isinstance(self.layers_to_transform, (str, bytes, set, frozenset, dict))
                or not all(_is_int(i) and i >= 0 for i in self.layers_to_transform)):
            raise ValueError(f"PedroConfig.layers_to_transform must be None, a layer index or a list "
                             f"of indices >= 0, got {self.layers_to_transform!r}")
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        if not isinstance(self.base_model_name_or_path, (str, type(None))):
            raise ValueError(f"PedroConfig.base_model_name_or_path must be a string or None, got "
                             f"{self.base_model_name_or_path!r}")
        if self.pool_norm not in POOL_NORMS:
            raise ValueError(f"PedroConfig.pool_norm must be one of {POOL_NORMS}, got {self.pool_norm!r}")
        if not (_is_number(self.init_scale) and 0 <= self.init_scale < float("inf")):
            raise ValueError(f"PedroConfig.init_scale must be a finite number >= 0, got {self.init_scale!r}")
        self.task_type = getattr(self.task_type, "value", self.task_type)  # peft's TaskType enum
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"PedroConfig.task_type must be None or 'CAUSAL_LM' (PEDRO adapts causal "
                             f"LMs), got {self.task_type!r}")
        if self.modules_to_save:
            raise ValueError(
                f"PedroConfig.modules_to_save={self.modules_to_save!r} is not supported: PEDRO trains "
                "only its vector generators, no copies of base-model modules; leave it None")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rational_degrees"] = list(self.rational_degrees)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PedroConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if d.get("peft_type", "PEDRO") != "PEDRO":
            raise ValueError(f"not a PEDRO adapter config: peft_type={d.get('peft_type')!r}")
        cfg = cls(**{"pool_norm": "none", **{k: v for k, v in d.items() if k in known}})
        cfg.extra.update({k: d[k] for k in unknown})
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str) -> None:
        """Write adapter_config.json into save_directory."""
        text = self.to_json()
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(text)

    @classmethod
    def from_pretrained(cls, path: str) -> "PedroConfig":
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
        with open(file) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
