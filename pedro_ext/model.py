"""PedroModel: PEDRO adapters on a Hugging Face causal LM, with peft's API shape.

Routing (which adapter each row uses, which positions form each prompt, the prompt's vectors)
belongs to one call: `forward`, `generate` and `prompt_vectors` build a `PedroCall` and make it
current for their duration (pedro_ext.routing). A direct call of the base model gets its own call
from a hook on the decoder stack: the active adapter for every row, as in peft.
"""
import contextlib
import contextvars
import functools
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import (CONFIG_NAME, DEFAULT_TARGET_MODULES, WEIGHTS_NAME, PedroConfig,
                     check_adapter_tensors)
from .layer import PedroAdapterWeights, PedroLayerBank, PedroLinear
from .mlp import fuse, fused_activation, unfuse
from .routing import (_CURRENT, PedroCall, RowSetting, StaticRouting, checkpoint_context_fn,
                      current_call, entered)

BASE_NAMES = (None, "__base__")
BIN_WEIGHTS_NAME = "adapter_model.bin"
_LAYER_RE = re.compile(r"^(?:(?P<stack>.*)\.)?layers\.(?P<idx>\d+)\.(?P<rest>.+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# PedroModels whose adapters `disable_adapter()` switched off, in this thread / task only.
_DISABLED: contextvars.ContextVar = contextvars.ContextVar("pedro_disabled", default=frozenset())
# peft keyword arguments that PEDRO accepts with these values only (PEDRO adapters are small
# fp32 vector generators and touch no embedding).
_PEFT_OPTIONS = {"autocast_adapter_dtype": (True,), "low_cpu_mem_usage": (False,),
                 "ephemeral_gpu_offload": (False,), "key_mapping": (None,),
                 "save_embedding_layers": ("auto", False),
                 "path_initial_model_for_weight_conversion": (None,)}


def _check_peft_kwargs(method: str, kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key not in _PEFT_OPTIONS:
            raise TypeError(f"PedroModel.{method}() got an unexpected keyword argument {key!r}")
        if value not in _PEFT_OPTIONS[key]:
            raise ValueError(f"PedroModel.{method}: {key}={value!r} is not supported by PEDRO "
                             f"(only {' or '.join(map(repr, _PEFT_OPTIONS[key]))})")


def _resolve_targets(model: nn.Module, config: PedroConfig) -> List[str]:
    if config.target_modules:
        return list(config.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"PEDRO has no default target modules for model_type={model_type!r} (known: "
            f"{sorted(DEFAULT_TARGET_MODULES)}); pass PedroConfig(target_modules=[...]) with the "
            "Q-like module first, e.g. ['q_proj', 'v_proj', 'up_proj']")
    return list(DEFAULT_TARGET_MODULES[model_type])


@dataclass
class _Layout:
    """Where PEDRO goes in a model: per decoder layer its target Linears, the layer module, and
    the decoder stack (the module holding `layers`) that every call passes through."""
    targets: Dict[int, Dict[str, tuple]]  # idx -> {target: (parent, attribute, Linear)}
    layers: Dict[int, nn.Module]
    stacks: List[nn.Module]


def _find_layout(model: nn.Module, targets: Sequence[str], layers: Optional[Sequence[int]]):
    found: Dict[int, Dict[str, tuple]] = {}
    stack_of: Dict[int, str] = {}
    for name, module in model.named_modules():
        mt = _LAYER_RE.match(name)
        if mt is None or not isinstance(module, nn.Linear):
            continue
        leaf = mt.group("rest").split(".")[-1]
        idx = int(mt.group("idx"))
        if leaf not in targets or (layers is not None and idx not in layers):
            continue
        stack = mt.group("stack") or ""
        if stack_of.setdefault(idx, stack) != stack:
            raise ValueError(f"decoder layer {idx} appears in two stacks ({stack_of[idx]!r} and "
                             f"{stack!r}); set PedroConfig.layers_to_transform")
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        found.setdefault(idx, {})[leaf] = (parent, name.rsplit(".", 1)[1], module)
    if layers is not None:
        if not layers:
            raise ValueError("PedroConfig.layers_to_transform is empty: give the decoder-layer "
                             "indices to adapt, or None for all")
        every = {int(m.group("idx")) for m in (_LAYER_RE.match(n) for n, mod in
                                               model.named_modules() if isinstance(mod, nn.Linear))
                 if m}
        absent = sorted(set(layers) - every)
        if every and absent:
            raise ValueError(f"PedroConfig.layers_to_transform has {absent}, which this model "
                             f"does not have (its decoder layers: {min(every)}..{max(every)})")
    if not found:
        raise ValueError(f"PEDRO found no Linear modules named {list(targets)} inside "
                         "'...layers.<i>...' of this model; set PedroConfig.target_modules")
    for idx, mods in found.items():
        missing = [t for t in targets if t not in mods]
        if missing:
            raise ValueError(f"decoder layer {idx} has no module(s) {missing} among its Linears")
    prefix = {idx: (s + "." if s else "") for idx, s in stack_of.items()}
    stacks = {s: model.get_submodule(s) for s in sorted(set(stack_of.values()))}
    return _Layout(targets=dict(sorted(found.items())),
                   layers={i: model.get_submodule(f"{prefix[i]}layers.{i}") for i in found},
                   stacks=list(stacks.values()))


def _cached_tokens(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple cache


_CONTINUATION = (
    "PEDRO: {what} on a continuation of a KV cache (a decoding step), where the prompt its "
    "adapters pool over is no longer visible: the vectors would come from the new tokens alone. "
    "Generate with PedroModel.generate (it computes the vectors once at prefill and reuses them), "
    "or run those rows on the base model (adapter_names=[None] * batch, or disable_adapter())")

# generate options whose first forward pass is not the whole prompt alone
_PREFILL_OPTIONS = {
    "prefill_chunk_size": "it prefills in chunks",
    "assistant_model": "assisted decoding runs the prompt with draft tokens",
    "prompt_lookup_num_tokens": "prompt-lookup decoding runs the prompt with draft tokens",
    "assistant_early_exit": "self-speculative decoding runs the prompt with draft tokens",
}

_NO_MERGE = ("PEDRO adapters cannot be merged into the base weights: their scaling vectors are "
             "computed from each prompt, so no fixed weight change reproduces them. Use "
             "unload() to get the base model back, or keep the PedroModel for inference.")


def _read_weights(path: str):
    """(state dict, file) of an adapter folder: safetensors, else peft's .bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(file):
        try:
            return load_file(file), file
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc
    file = os.path.join(path, BIN_WEIGHTS_NAME)
    if os.path.isfile(file):
        try:
            return torch.load(file, map_location="cpu", weights_only=True), file
        except Exception as exc:  # torch.load raises several unrelated types for bad files
            raise ValueError(f"{file} is not a readable torch file: {exc}") from exc
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {BIN_WEIGHTS_NAME}) in {path!r}")


def _check_positions(name: str, x) -> None:
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, no positions: PEDRO pools each "
                         "prompt's hidden states, so a prompt needs at least one token")


def _write_all(writes: List[Tuple[str, Callable[[str], None]]]) -> None:
    """Write every (file, write(path)) to a temporary file beside it, then move them all into
    place: if any write fails, no destination has changed (folders made for it are removed)."""
    made, temps = [], []
    try:
        for file, write in writes:
            folder = os.path.dirname(file) or "."
            missing = []
            while not os.path.isdir(folder):
                missing.append(folder)
                folder = os.path.dirname(folder)
            for m in reversed(missing):
                os.mkdir(m)
                made.append(m)
            temps.append((f"{file}.tmp{os.getpid()}", file))
            write(temps[-1][0])
        for tmp, file in temps:
            os.replace(tmp, file)
        temps, made = [], []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        for m in reversed(made):
            with contextlib.suppress(OSError):  # (not empty: a move failed after others)
                os.rmdir(m)


def _torch_save(tensors, file: str) -> None:
    torch.save(tensors, file)


def _write_text(text: str, file: str) -> None:
    with open(file, "w") as f:
        f.write(text)


@dataclass
class PedroModelStatus:
    """peft's TunerModelStatus, for a PedroModel."""
    base_model_type: str
    adapter_model_type: str
    peft_types: Dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool
    active_adapters: List[str]
    merged_adapters: List[str]
    requires_grad: Dict[str, Union[bool, str]]
    available_adapters: List[str]
    devices: Dict[str, List[str]]


class PedroTunerModel(nn.Module):
    """`pedro.base_model`, in peft's place of LoraModel: `pedro.base_model.model` is the causal
    LM being adapted. Attributes it lacks are looked up on that model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (copy / unpickling): no recursion
                raise
            return getattr(self.model, name)


class PedroModel(PreTrainedModel):
    """A causal LM with PEDRO adapters: one stacked bank per decoder layer, every request of a
    batch with its own adapter (or none), one op call per layer for the whole batch.

    A PreTrainedModel subclass only so that transformers.Trainer saves it through
    save_pretrained (writing the adapter files, as it does for peft models); Trainer writes the
    full state dict of any other module, which fails on tied embeddings. It wraps an existing
    model and shares its config, so PreTrainedModel.__init__ (which builds a model from a config
    and adjusts that config) is not run; attributes the class does not define are read from the
    wrapped model."""

    # PreTrainedModel's own value would hide the wrapped model's.
    base_model = property(lambda self: self._modules["base_model"])
    main_input_name = property(lambda self: self.get_base_model().main_input_name)
    supports_gradient_checkpointing = property(
        lambda self: getattr(self.get_base_model(), "supports_gradient_checkpointing", False))
    _no_split_modules = property(lambda self: getattr(self.get_base_model(), "_no_split_modules", None))
    _keep_in_fp32_modules = property(
        lambda self: getattr(self.get_base_model(), "_keep_in_fp32_modules", None))

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_input_embeddings(self) -> nn.Module:
        return self.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.get_base_model().get_output_embeddings()

    def __init__(self, model: nn.Module, config: PedroConfig, adapter_name: str = "default"):
        nn.Module.__init__(self)
        if isinstance(model, PedroModel):
            raise ValueError("this model is already a PedroModel; add adapters with "
                             "pedro.add_adapter(name, config)")
        if any(isinstance(m, PedroLinear) for m in model.modules()):
            raise ValueError(
                "this model is already wrapped by PEDRO (its Linears are PedroLinear modules of "
                "another PedroModel); add adapters to that PedroModel with add_adapter, or call "
                "its unload() first")
        self.base_model = PedroTunerModel(model)
        self.peft_config: Dict[str, PedroConfig] = {}
        self.active_adapters: List[str] = []
        self.banks: Dict[int, PedroLayerBank] = {}
        self._index: Dict[str, int] = {}
        self._order: List[str] = []
        self._layers_enabled = True
        self._static = StaticRouting()
        self._undo: List[tuple] = []  # how to restore the base model, applied newest first
        self._unloaded = False
        try:
            self._targets = _resolve_targets(model, config)
            self._layers_to_transform = config.layers_to_transform
            self._check_compatible(adapter_name, config)
            self._wrap(model, _find_layout(model, self._targets, config.layers_to_transform))
            self.training = self.base_model.training = model.training
            self.add_adapter(adapter_name, config)
        except BaseException:
            self._restore()
            raise

    # ------------------------------------------------------------------ wrapping
    def _wrap(self, model: nn.Module, layout: _Layout) -> None:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        self._undo.append(("requires_grad", flags))
        for p, _ in flags:
            p.requires_grad_(False)
        self._decoder_layers = list(layout.layers.values()) + list(layout.stacks)
        self._stacks = layout.stacks
        self._sources: Dict[int, nn.Linear] = {}  # each bank's source Linear (its device)
        for idx, mods in layout.targets.items():
            source = mods[self._targets[0]][2]
            slots, start = [], 0
            for t in self._targets:
                out = mods[t][2].out_features
                slots.append((start, start + out))
                start += out
            bank = PedroLayerBank(idx, source.in_features, start, slots)
            self._sources[idx] = source
            for slot, t in enumerate(self._targets):
                parent, attr, linear = mods[t]
                # in the wrapped Linear's mode (an eval-mode model runs no adapter dropout)
                setattr(parent, attr, PedroLinear(linear, bank, slot, slot == 0,
                                                  self._static).train(linear.training))
                self._undo.append(("module", parent, attr, linear))
            self.banks[idx] = bank
            mlp = mods[self._targets[-1]][0]
            activation = fused_activation(mlp)
            if activation is not None:
                fuse(mlp, activation)
                self._undo.append(("fused", mlp))
        for stack in layout.stacks:
            pre = stack.register_forward_pre_hook(self._stack_pre_hook, with_kwargs=True)
            post = stack.register_forward_hook(self._stack_post_hook, with_kwargs=True,
                                               always_call=True)
            self._undo.extend([("hook", pre), ("hook", post)])

    def _restore(self) -> None:
        while self._undo:
            kind, *what = self._undo.pop()
            if kind == "requires_grad":
                for p, flag in what[0]:
                    p.requires_grad_(flag)
            elif kind == "module":
                setattr(*what)
            elif kind == "fused":
                unfuse(what[0])
            else:
                what[0].remove()
        self.banks = {}

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (copy / unpickling): no recursion
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The causal LM being adapted (peft's `pedro.base_model.model`)."""
        return self.base_model.model

    # ------------------------------------------------------------------ adapters
    def _check_compatible(self, name: str, config: PedroConfig) -> None:
        targets = config.target_modules or self._targets
        if list(targets) != self._targets:
            raise ValueError(f"adapter {name!r} targets {list(targets)} but this model's PEDRO "
                             f"layers target {self._targets}; one bank needs one layout")
        if config.layers_to_transform != self._layers_to_transform:
            raise ValueError(f"adapter {name!r} has layers_to_transform="
                             f"{config.layers_to_transform}, the model uses "
                             f"{self._layers_to_transform}")
        mc = getattr(self.get_base_model(), "config", None)
        for key, have in (("hidden_size", getattr(mc, "hidden_size", None)),
                          ("num_layers", getattr(mc, "num_hidden_layers", None))):
            want = getattr(config, key)
            if want is not None and have is not None and want != have:
                raise ValueError(f"adapter {name!r} was made for a model with {key}={want}, this "
                                 f"model has {key}={have}")

    def add_adapter(self, adapter_name: str, peft_config: PedroConfig) -> None:
        """Add a fresh adapter (the identity until trained). The first adapter of a model that
        has none active becomes the active one; otherwise, as in peft, call set_adapter."""
        if self._unloaded:
            raise ValueError("this PedroModel was unloaded; wrap the model again with "
                             "get_pedro_model to add adapters")
        if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name) \
                or adapter_name == "__base__":
            raise ValueError(f"adapter name must be letters, digits, '_' or '-' (and not "
                             f"'__base__'), got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not isinstance(peft_config, PedroConfig):
            raise TypeError(f"add_adapter needs a PedroConfig, got {type(peft_config).__name__}")
        self._check_compatible(adapter_name, peft_config)
        # the adapter's own copy: the caller's object may configure other models and adapters
        peft_config = PedroConfig.from_dict(peft_config.to_dict())
        mc = getattr(self.get_base_model(), "config", None)
        peft_config.model_type = getattr(mc, "model_type", peft_config.model_type)
        peft_config.hidden_size = getattr(mc, "hidden_size", peft_config.hidden_size)
        peft_config.num_layers = getattr(mc, "num_hidden_layers", peft_config.num_layers)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(mc, "_name_or_path", None) or None
        peft_config.target_modules = list(self._targets)
        created = []
        try:
            for idx, bank in self.banks.items():
                weights = PedroAdapterWeights(peft_config, bank.d, bank.big_d).to(
                    self._sources[idx].weight.device).train(bank.training)
                for p in weights.parameters():
                    p.requires_grad_(False)
                bank.adapters[adapter_name] = weights
                created.append(bank)
        except BaseException:
            for bank in created:
                del bank.adapters[adapter_name]
            raise
        self.peft_config[adapter_name] = peft_config
        self._bank_changed()
        if not self.active_adapters:
            self.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was the active one, the first remaining adapter becomes
        active; after the last one, calls run the base model until an adapter is added."""
        self._require(adapter_name)
        del self.peft_config[adapter_name]
        self._bank_changed()  # first: a call in flight then fails cleanly instead of reading a gap
        for bank in self.banks.values():
            del bank.adapters[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters = []
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make one adapter active: the default for rows without adapter_names, and trainable
        unless `inference_mode` (or the adapter was loaded for inference). Others are frozen."""
        if not isinstance(adapter_name, str):
            raise ValueError(
                f"set_adapter takes one adapter name, got {adapter_name!r}: a PedroModel, like "
                "peft's PeftModel, has one active adapter. To train several adapters in one "
                "batch use set_requires_grad([...]) and pass adapter_names=[...] (one per row)")
        self._require(adapter_name)
        self.active_adapters = [adapter_name]
        for name, config in self.peft_config.items():
            self._set_grad(name, name == adapter_name and not inference_mode
                           and not config.inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]],
                          requires_grad: bool = True) -> None:
        """Enable or disable gradients of the given adapter(s) (peft's set_requires_grad).
        Training several adapters on mixed batches: a step gives gradients only to the adapters
        its rows use (the others' stay None, as in peft), so under DistributedDataParallel pass
        find_unused_parameters=True (and no static_graph)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self._require(n)
        for n in names:
            self._set_grad(n, requires_grad)

    def _set_grad(self, name: str, flag: bool) -> None:
        for bank in self.banks.values():
            w = bank.adapters[name]
            rational = {id(p) for p in w.rational_parameters()}
            for p in w.parameters():
                p.requires_grad_(flag and (w.rational_trainable or id(p) not in rational))

    @property
    def active_adapter(self) -> Optional[str]:
        return self.active_adapters[0] if self.active_adapters else None

    def _require(self, name: str) -> None:
        if not isinstance(name, str) or name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; this model has {list(self.peft_config)}")

    def _bank_changed(self) -> None:
        order = list(self.peft_config)
        if order != self._order:  # a new list when the set changes: calls and banks compare
            self._order = order   # identities (a call made before the change fails cleanly)
            self._index = {n: i for i, n in enumerate(order)}
        for bank in self.banks.values():
            bank.order = self._order
            bank.invalidate()

    def _move_adapter(self, name: str, device) -> None:
        for bank in self.banks.values():
            bank.adapters[name].to(device)
        self._bank_changed()

    def train(self, mode: bool = True):
        super().train(mode)
        self._bank_changed()  # weights may have moved since the inference bank was cached
        return self

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block every row runs the base model (in this thread / task only)."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield
        finally:
            _DISABLED.reset(token)

    def enable_adapter_layers(self) -> None:
        """Turn PEDRO back on after disable_adapter_layers (peft's API)."""
        self._layers_enabled = True

    def disable_adapter_layers(self) -> None:
        """Run the base model for every call until enable_adapter_layers (peft's API)."""
        self._layers_enabled = False

    def adapter_parameters(self, adapter_name: Optional[str] = None) -> Iterable[nn.Parameter]:
        name = adapter_name or self._active_or_raise()
        self._require(name)
        for bank in self.banks.values():
            yield from bank.adapters[name].parameters()

    def rational_parameters(self, adapter_name: Optional[str] = None) -> List[nn.Parameter]:
        name = adapter_name or self._active_or_raise()
        self._require(name)
        return [p for bank in self.banks.values() for p in bank.adapters[name].rational_parameters()]

    def _active_or_raise(self) -> str:
        if not self.active_adapters:
            raise ValueError("this PedroModel has no active adapter; name one")
        return self.active_adapter

    # ------------------------------------------------------------------ routing of calls
    def _make_call(self, batch: int, adapter_names, attention_mask, prompt_mask, prompt_lengths,
                   reuse: bool, direct: bool = False, dropout: bool = True) -> PedroCall:
        if adapter_names is None:
            names = [self.active_adapter] * batch
        elif isinstance(adapter_names, str):
            raise ValueError(f"adapter_names must be a list with one name per row, got the string "
                             f"{adapter_names!r}; e.g. adapter_names=[{adapter_names!r}] * batch")
        elif isinstance(adapter_names, (set, frozenset, dict)):
            raise ValueError(f"adapter_names must be a list with one name per row, in row order; "
                             f"got a {type(adapter_names).__name__}, which has no order")
        else:
            names = list(adapter_names)
            if len(names) != batch:
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has "
                                 f"{batch} rows; give one name (or None / '__base__') per row")
        off = not self._layers_enabled or id(self) in _DISABLED.get() or not self.banks
        order = self._order  # read before the index: a change in between fails in the layers
        ids, settings = [], []
        for n in names:
            if n in BASE_NAMES:
                ids.append(-1)
                settings.append(None)
                continue
            if n not in self._index:
                raise ValueError(f"unknown adapter {n!r} in adapter_names; this model has "
                                 f"{list(self.peft_config)} (None or '__base__' for the base model)")
            cfg = self.peft_config[n]
            ids.append(-1 if off else self._index[n])
            settings.append(None if off else RowSetting(cfg.pooling, cfg.pool_norm, cfg.dropout))
        return PedroCall(self, ids, settings, self._pool_mask(batch, attention_mask, prompt_mask,
                                                              prompt_lengths),
                         reuse=reuse, direct=direct, dropout=dropout, order=order)

    @staticmethod
    def _pool_mask(batch, attention_mask, prompt_mask, prompt_lengths) -> Optional[torch.Tensor]:
        def check(name, t):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != batch:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a [batch={batch}, positions] tensor, got {shape}")
        mask = None
        if attention_mask is not None:
            check("attention_mask", attention_mask)
            mask = attention_mask.bool()
        if prompt_lengths is not None:
            if prompt_mask is not None:
                raise ValueError("give prompt_mask or prompt_lengths, not both")
            if mask is None:
                raise ValueError("prompt_lengths needs attention_mask (to find the real tokens)")
            lengths = torch.as_tensor(prompt_lengths, device=mask.device)
            if lengths.shape != (batch,):
                raise ValueError(f"prompt_lengths must have one entry per row ({batch}), got "
                                 f"shape {tuple(lengths.shape)}")
            if lengths.is_floating_point() or lengths.is_complex() or \
                    (batch and int(lengths.min()) < 1):  # (one sync per training forward)
                raise ValueError(f"prompt_lengths must be integers >= 1 (a prompt has a token "
                                 f"to pool), got {lengths.tolist()}")
            prompt_mask = mask & (mask.long().cumsum(1) <= lengths.view(-1, 1))
        if prompt_mask is not None:
            check("prompt_mask", prompt_mask)
            if mask is not None and prompt_mask.shape != mask.shape:
                raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)} but "
                                 f"attention_mask has {tuple(mask.shape)}")
            mask = prompt_mask.bool() if mask is None else mask & prompt_mask.bool()
        return mask

    def _stack_pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            if self._static.active:
                return None  # compiled decode steps read the static routing tensors
            return _enter_direct_eagerly(self, args, kwargs)
        return _enter_direct(self, args, kwargs)

    def _stack_post_hook(self, module, args, kwargs, output):
        if torch.compiler.is_compiling():
            if self._static.active:
                return None
            return _leave_direct_eagerly(self)
        return _leave_direct(self)

    def _check_checkpointing(self) -> None:
        for layer in self._decoder_layers:
            if getattr(layer, "gradient_checkpointing", False):
                keywords = getattr(getattr(layer, "_gradient_checkpointing_func", None),
                                   "keywords", None) or {}
                if not getattr(keywords.get("context_fn"), "pedro_reenters_call", False):
                    raise ValueError(
                        "gradient checkpointing was enabled on the base model directly, so its "
                        "recomputation would not see this call's adapters; enable it with "
                        "PedroModel.gradient_checkpointing_enable(...) instead")

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        x, name = input_ids, "input_ids"
        if x is None:
            x, name = kwargs.get("inputs_embeds"), "inputs_embeds"
        if x is None:
            raise ValueError("pass input_ids or inputs_embeds")
        _check_positions(name, x)
        return x.shape[0]

    # ------------------------------------------------------------------ calls
    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None,
                prompt_mask=None, prompt_lengths=None, **kwargs):
        """The base model's forward; adapter_names gives each row's adapter (None or
        '__base__': base model), prompt_mask [B, T] / prompt_lengths [B] restrict pooling to
        the instruction part (the loss still covers the whole sequence)."""
        batch = self._batch_size(input_ids, kwargs)
        if self.training and torch.is_grad_enabled():
            self._check_checkpointing()
        call = self._make_call(batch, adapter_names, attention_mask, prompt_mask, prompt_lengths,
                               reuse=False)
        if call.any_adapter and _cached_tokens(kwargs.get("cache", kwargs.get("past_key_values"))):
            raise ValueError(_CONTINUATION.format(what="PedroModel.forward was called"))
        with entered(call):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """HF generate (same arguments: inputs / input_ids, attention_mask, ...); each row's
        vectors come from its prompt at prefill and are reused for every generated token.
        With a static cache (cache_implementation="static", e.g. for a compiled decode step)
        the vectors sit in persistent tensors that graph-captured steps read.
        Each wrapped module reads its base Linear (weights, hooks, forward) once per call, at
        its first run: a hook registered or a weight reassigned while a generate call runs
        (from a streamer or a stopping criterion) takes effect from the next call; in-place
        weight edits show at once."""
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if kwargs.get("inputs_embeds") is not None:  # (HF then reads the prompt from these)
            _check_positions("inputs_embeds", kwargs["inputs_embeds"])
        elif not isinstance(inputs, torch.Tensor):
            raise ValueError("PedroModel.generate needs the prompt as a tensor: inputs / input_ids "
                             "[batch, positions] (or inputs_embeds)")
        else:
            _check_positions("the prompt (inputs / input_ids)", inputs)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if _cached_tokens(cache) > 0:
            raise ValueError(
                "PedroModel.generate computes each prompt's vectors at prefill and cannot continue "
                "from a cache that already holds tokens; pass the whole conversation as the prompt")
        for name, why in _PREFILL_OPTIONS.items():
            value = self._generation_option(kwargs, name)
            if value is not None:
                shown = repr(value) if isinstance(value, (int, float, str)) else \
                    f"<{type(value).__name__}>"
                raise ValueError(f"PedroModel.generate cannot take {name}={shown}: {why}; each "
                                 "prompt's vectors are pooled over the whole prompt, and only the "
                                 "prompt, at its first forward pass")
        if kwargs.get("attention_mask") is None and kwargs.get("inputs_embeds") is None:
            # the mask HF would infer for attention, given to both attention and pooling (which
            # would otherwise pool over the pads)
            mask = self._inferred_mask(inputs, kwargs)
            if mask is not None:
                kwargs["attention_mask"] = mask
        call = self._make_call(inputs.shape[0], adapter_names, kwargs.get("attention_mask"), None,
                               None, reuse=True)
        with contextlib.ExitStack() as stack:
            if self._uses_static_cache(kwargs, cache):
                stack.enter_context(self._static.borrowed(call))
            stack.enter_context(entered(call))
            return self.get_base_model().generate(*args, **kwargs)

    def _generation_option(self, kwargs, name):
        """A generate option as HF resolves it: the keyword, else the generation_config passed,
        else the model's (None if none sets it)."""
        for source in (kwargs, kwargs.get("generation_config"),
                       getattr(self.get_base_model(), "generation_config", None)):
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return value
        return None

    def _inferred_mask(self, inputs, kwargs) -> Optional[torch.Tensor]:
        """HF's rule for a prompt given without a mask: token ids that hold the pad token (when
        it is not an EOS token) are masked where they equal it."""
        if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 2
                and inputs.dtype in (torch.int32, torch.int64)):
            return None
        pad = self._generation_option(kwargs, "pad_token_id")
        eos = self._generation_option(kwargs, "eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if pad is None or pad in eos or not bool((inputs == pad).any()):
            return None
        return inputs.ne(pad).long()

    def _uses_static_cache(self, kwargs, cache) -> bool:
        from transformers.cache_utils import DynamicCache
        from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

        if cache is not None:
            return bool(getattr(cache, "is_compileable", False)) and type(cache) is not DynamicCache
        impl = self._generation_option(kwargs, "cache_implementation")
        return impl is not None and impl in ALL_STATIC_CACHE_IMPLEMENTATIONS

    @torch.no_grad()
    def prompt_vectors(self, input_ids, attention_mask=None, adapter_names=None, prompt_mask=None,
                       prompt_lengths=None) -> Dict[int, torch.Tensor]:
        """Each layer's PEDRO vectors [B, D] (fp32, ones for base rows) for these prompts, as a
        generate call would compute them at prefill (no dropout)."""
        batch = input_ids.shape[0]
        call = self._make_call(batch, adapter_names, attention_mask, prompt_mask, prompt_lengths,
                               reuse=False, dropout=False)
        if call.any_adapter:
            if len(self._stacks) != 1:
                raise ValueError("prompt_vectors needs a model with one decoder stack")
            self._bank_changed()  # weights may have been trained since the bank was cached
            with entered(call):
                self._stacks[0](input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False)
        return {idx: call.vectors[idx].float() if idx in call.vectors else
                torch.ones(batch, bank.big_d, device=input_ids.device)
                for idx, bank in self.banks.items()}

    @property
    def vector_computations(self) -> int:
        """How many times a layer computed PEDRO vectors (a counter, for tests and profiling)."""
        return sum(bank.computations for bank in self.banks.values())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the base model's decoder layers, non-reentrant; the recomputation
        re-enters the call the layer ran in (a `context_fn`), so it sees that call's adapters,
        prompt masks and dropout even when backward runs after the call or on another thread."""
        ckpt = dict(gradient_checkpointing_kwargs or {})
        if ckpt.get("use_reentrant", False):
            raise ValueError("PEDRO needs non-reentrant checkpointing (use_reentrant=False): "
                             "only that variant can re-enter the call's routing on recompute")
        ckpt["use_reentrant"] = False
        ckpt["context_fn"] = checkpoint_context_fn(ckpt.get("context_fn"))
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """transformers 5's name (Trainer calls it with gradient_checkpointing=True)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ parameters / status
    def get_nb_trainable_parameters(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def adapter_num_parameters(self, adapter_name: Optional[str] = None) -> int:
        return sum(p.numel() for p in self.adapter_parameters(adapter_name))

    def get_model_status(self) -> PedroModelStatus:
        trainable, total = self.get_nb_trainable_parameters()
        grads, devices = {}, {}
        for name in self.peft_config:
            flags = {p.requires_grad for p in self.adapter_parameters(name)
                     if not any(p is q for q in self.rational_parameters(name))}
            grads[name] = flags.pop() if len(flags) == 1 else "irregular"
            devices[name] = sorted({str(p.device) for p in self.adapter_parameters(name)})
        return PedroModelStatus(
            base_model_type=type(self.get_base_model()).__name__, adapter_model_type="PedroModel",
            peft_types={n: "PEDRO" for n in self.peft_config}, trainable_params=trainable,
            total_params=total, num_adapter_layers=len(self.banks) * len(self._targets),
            enabled=self._layers_enabled,
            active_adapters=list(self.active_adapters), merged_adapters=[],
            requires_grad=grads, available_adapters=sorted(self.peft_config), devices=devices)

    # ------------------------------------------------------------------ save / load
    def adapter_state_dict(self, adapter_name: str,
                           state_dict: Optional[Dict[str, torch.Tensor]] = None
                           ) -> Dict[str, torch.Tensor]:
        """The adapter's tensors under their file names (layers.<i>.<name>). From `state_dict`
        (this model's full state dict, as Trainer / DeepSpeed gather it) where given."""
        self._require(adapter_name)
        full = {}
        if state_dict is not None:
            full = {m: path for path, m in self.named_modules() if isinstance(m, PedroLayerBank)}
        state = {}
        for idx, bank in self.banks.items():
            for key, p in bank.adapters[adapter_name].named_parameters():
                t = p
                if bank in full:
                    t = state_dict.get(f"{full[bank]}.adapters.{adapter_name}.{key}", p)
                state[f"layers.{idx}.{key}"] = t.detach().contiguous().cpu()
        return state

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[List[str]] = None,
                        save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True, *,
                        state_dict: Optional[Dict[str, torch.Tensor]] = None, **kwargs) -> None:
        """adapter_config.json + adapter_model.safetensors (.bin without safe_serialization) per
        adapter; "default" at the top, other adapters in sub-folders named after them (peft's
        layout). Only the main process writes. Each file is replaced atomically. `state_dict`
        (this model's, as Trainer / DeepSpeed gather it) is where the weights are taken from."""
        from safetensors.torch import save_file

        _check_peft_kwargs("save_pretrained", dict(kwargs, save_embedding_layers=save_embedding_layers))
        if not self.peft_config:
            raise ValueError("this PedroModel has no adapters to save")
        if isinstance(selected_adapters, str):
            selected_adapters = [selected_adapters]
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require(name)
        if not is_main_process:
            return
        # Every file is written beside its destination first and the old files are replaced
        # only once all are written: a save that fails leaves the folder as it was.
        writes = []
        for name in names:
            path = save_directory if name == "default" else os.path.join(save_directory, name)
            tensors = self.adapter_state_dict(name, state_dict)
            if safe_serialization:
                writes.append((os.path.join(path, WEIGHTS_NAME), functools.partial(
                    save_file, tensors, metadata={"format": "pt", "peft_type": "PEDRO"})))
            else:
                writes.append((os.path.join(path, BIN_WEIGHTS_NAME),
                               functools.partial(_torch_save, tensors)))
            config = self.peft_config[name].to_json()  # (fails here, before any write)
            writes.append((os.path.join(path, CONFIG_NAME), functools.partial(_write_text, config)))
        _write_all(writes)

    def _copy_weights(self, adapter_name: str, state: Dict[str, torch.Tensor], file: str) -> None:
        expected = self.adapter_state_dict(adapter_name)
        check_adapter_tensors(state, {k: v.shape for k, v in expected.items()}, file)
        with torch.no_grad():
            for idx, bank in self.banks.items():
                for key, p in bank.adapters[adapter_name].named_parameters():
                    p.copy_(state[f"layers.{idx}.{key}"])
        self._bank_changed()

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, *, subfolder: Optional[str] = None,
                     **kwargs) -> None:
        """Load a saved adapter under a new name (peft's load_adapter: it is not made active,
        unless the model has no active adapter; trainable only with is_trainable)."""
        _check_peft_kwargs("load_adapter", kwargs)
        path = os.path.join(model_id, subfolder) if subfolder else model_id
        config = PedroConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        state, file = _read_weights(path)
        try:
            self.add_adapter(adapter_name, config)
        except ValueError as exc:
            raise ValueError(f"cannot load the PEDRO adapter in {path!r}: {exc}") from exc
        try:
            self._copy_weights(adapter_name, state, file)
            if torch_device is not None:
                self._move_adapter(adapter_name, torch_device)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._set_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()  # (as peft: no adapter dropout at inference)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PedroConfig] = None, *,
                        subfolder: Optional[str] = None, torch_device: Optional[str] = None,
                        **kwargs) -> "PedroModel":
        """Wrap `model` with the adapter saved in `model_id` (peft's PeftModel.from_pretrained).
        On any error the model is left exactly as it was."""
        _check_peft_kwargs("from_pretrained", kwargs)
        path = os.path.join(model_id, subfolder) if subfolder else model_id
        config = PedroConfig.from_dict(config.to_dict()) if config is not None else \
            PedroConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        state, file = _read_weights(path)
        try:
            pedro = cls(model, config, adapter_name=adapter_name)
        except ValueError as exc:
            raise ValueError(f"cannot load the PEDRO adapter in {path!r}: {exc}") from exc
        try:
            pedro._copy_weights(adapter_name, state, file)
            if torch_device is not None:
                pedro._move_adapter(adapter_name, torch_device)
        except BaseException:
            pedro.unload()
            raise
        if not is_trainable:
            pedro.eval()  # (as peft: no adapter dropout at inference)
        return pedro

    # ------------------------------------------------------------------ unwrapping
    def unload(self) -> nn.Module:
        """The base model exactly as it was before wrapping (original Linears and MLP forwards,
        no hooks, its parameters' requires_grad flags); this PedroModel then has no adapters."""
        self._restore()
        self.peft_config = {}
        self.active_adapters = []
        self._index, self._order = {}, []
        self._unloaded = True
        return self.get_base_model()

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(_NO_MERGE)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(_NO_MERGE)

    def unmerge_adapter(self, *args, **kwargs):
        raise NotImplementedError(_NO_MERGE)


def _enter_direct(pedro: PedroModel, args, kwargs) -> None:
    """A call of the base model that no PedroModel call set up (peft's convention: the active
    adapter for every row, pooling over this forward's positions)."""
    call = current_call()
    if call is not None and call.model is pedro:
        call.nested += call.direct
        return
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if not isinstance(x, torch.Tensor):
        return  # the model itself reports the missing input
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        mask = None  # a 4D / custom mask: pool over every position
    call = pedro._make_call(x.shape[0], None, mask, None, None, reuse=False, direct=True)
    if call.any_adapter and _cached_tokens(kwargs.get("cache", kwargs.get("past_key_values"))):
        raise RuntimeError(_CONTINUATION.format(what="the base model was called directly"))
    call.token = _CURRENT.set(call)


def _leave_direct(pedro: PedroModel) -> None:
    call = current_call()
    if call is None or call.model is not pedro:
        return
    if call.direct:
        if call.nested:
            call.nested -= 1
        else:
            _CURRENT.reset(call.token)
    elif call.static is not None:
        call.static.prefilled = True  # the first pass of a static generate call is its prefill


_enter_direct_eagerly = torch.compiler.disable(_enter_direct)
_leave_direct_eagerly = torch.compiler.disable(_leave_direct)


def get_pedro_model(model: nn.Module, config: PedroConfig, adapter_name: str = "default") -> PedroModel:
    """Wrap a Hugging Face causal LM with a PEDRO adapter (peft's get_peft_model, for PEDRO).
    On any error the model is left exactly as it was."""
    return PedroModel(model, config, adapter_name=adapter_name)
