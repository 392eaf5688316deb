"""PedroModel: PEDRO adapters on a Hugging Face causal LM, with peft's API shape."""
import contextlib
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .config import DEFAULT_TARGET_MODULES, WEIGHTS_NAME, PedroConfig
from .layer import PedroAdapterWeights, PedroLayerBank, PedroLinear, ServeContext

BASE_NAMES = (None, "__base__")
_LAYER_RE = re.compile(r"^(?P<layer>.*\.layers\.(?P<idx>\d+))\.(?P<rest>.+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


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


def _find_layers(model: nn.Module, targets: Sequence[str], layers: Optional[Sequence[int]]):
    """{layer index: {target: (parent module, attribute, Linear)}} for every decoder layer."""
    found: Dict[int, Dict[str, tuple]] = {}
    for name, module in model.named_modules():
        mt = _LAYER_RE.match(name)
        if mt is None or not isinstance(module, nn.Linear):
            continue
        leaf = mt.group("rest").split(".")[-1]
        if leaf not in targets:
            continue
        idx = int(mt.group("idx"))
        if layers is not None and idx not in layers:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        found.setdefault(idx, {})[leaf] = (parent, name.rsplit(".", 1)[1], module)
    if not found:
        raise ValueError(f"PEDRO found no Linear modules named {list(targets)} inside "
                         "'...layers.<i>...' of this model; set PedroConfig.target_modules")
    for idx, mods in found.items():
        missing = [t for t in targets if t not in mods]
        if missing:
            raise ValueError(f"decoder layer {idx} has no module(s) {missing} among its Linears")
    return dict(sorted(found.items()))


class PedroModel(nn.Module):
    """A causal LM with PEDRO adapters: one stacked bank per decoder layer, every request of a
    batch with its own adapter (or none), one op call per layer for the whole batch."""

    def __init__(self, model: nn.Module, config: PedroConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: Dict[str, PedroConfig] = {}
        self.active_adapters: List[str] = []
        self._ctx = ServeContext()
        self._disabled = False
        for p in model.parameters():
            p.requires_grad_(False)
        self._targets = _resolve_targets(model, config)
        self._layers_to_transform = config.layers_to_transform
        self.banks: Dict[int, PedroLayerBank] = {}
        self._wrapped: List[tuple] = []  # (parent, attribute, original Linear)
        for idx, mods in _find_layers(model, self._targets, config.layers_to_transform).items():
            source = mods[self._targets[0]][2]
            slots, start = [], 0
            for t in self._targets:
                out = mods[t][2].out_features
                slots.append((start, start + out))
                start += out
            bank = PedroLayerBank(source.in_features, start, slots, self._ctx)
            bank.to(source.weight.device)
            for slot, t in enumerate(self._targets):
                parent, attr, linear = mods[t]
                setattr(parent, attr, PedroLinear(linear, bank, slot, is_source=(slot == 0)))
                self._wrapped.append((parent, attr, linear))
            self.banks[idx] = bank
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (copy / unpickling): no recursion
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ adapters
    def _check_compatible(self, name: str, config: PedroConfig):
        targets = config.target_modules or self._targets
        if list(targets) != self._targets:
            raise ValueError(f"adapter {name!r} targets {list(targets)} but this model's PEDRO "
                             f"layers target {self._targets}; one bank needs one layout")
        if config.layers_to_transform != self._layers_to_transform:
            raise ValueError(f"adapter {name!r} has layers_to_transform="
                             f"{config.layers_to_transform}, the model uses "
                             f"{self._layers_to_transform}")
        mc = getattr(self.base_model, "config", None)
        for key, have in (("hidden_size", getattr(mc, "hidden_size", None)),
                          ("num_layers", getattr(mc, "num_hidden_layers", None))):
            want = getattr(config, key)
            if want is not None and have is not None and want != have:
                raise ValueError(f"adapter {name!r} was made for a model with {key}={want}, this "
                                 f"model has {key}={have}")

    def add_adapter(self, adapter_name: str, config: PedroConfig) -> None:
        if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name) \
                or adapter_name == "__base__":
            raise ValueError(f"adapter name must be letters, digits, '_' or '-' (and not "
                             f"'__base__'), got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        self._check_compatible(adapter_name, config)
        mc = getattr(self.base_model, "config", None)
        config.model_type = getattr(mc, "model_type", config.model_type)
        config.hidden_size = getattr(mc, "hidden_size", config.hidden_size)
        config.num_layers = getattr(mc, "num_hidden_layers", config.num_layers)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(mc, "_name_or_path", None) or None
        config.target_modules = list(self._targets)
        for bank in self.banks.values():
            device = next(bank.parameters(), torch.empty(0)).device if bank.adapters else \
                self._bank_device(bank)
            weights = PedroAdapterWeights(config, bank.d, bank.big_d).to(device)
            for p in weights.parameters():
                p.requires_grad_(False)
            bank.adapters[adapter_name] = weights
        self.peft_config[adapter_name] = config
        self._bank_changed()

    def _bank_device(self, bank: PedroLayerBank) -> torch.device:
        for parent, attr, linear in self._wrapped:
            module = getattr(parent, attr)
            if module.bank is bank:
                return linear.weight.device
        return torch.device("cpu")

    def delete_adapter(self, adapter_name: str) -> None:
        self._require(adapter_name)
        for bank in self.banks.values():
            del bank.adapters[adapter_name]
        del self.peft_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._bank_changed()

    def set_adapter(self, adapter_name: Union[str, List[str]]) -> None:
        """Make adapter(s) active: the default for rows without adapter_names, and trainable
        (unless loaded for inference). Other adapters are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._require(n)
        self.active_adapters = names
        for name, config in self.peft_config.items():
            trainable = name in names and not config.inference_mode
            for bank in self.banks.values():
                w = bank.adapters[name]
                for p in w.parameters():
                    is_rat = any(p is q for q in w.rational_parameters())
                    p.requires_grad_(trainable and (w.rational_trainable or not is_rat))
        self._bank_changed()

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; this model has {list(self.peft_config)}")

    def _bank_changed(self) -> None:
        order = list(self.peft_config)
        for bank in self.banks.values():
            bank.order = order
            bank.invalidate()

    def train(self, mode: bool = True):
        super().train(mode)
        self._bank_changed()  # weights may have moved since the inference bank was cached
        return self

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block every row runs the base model."""
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False

    def adapter_parameters(self, adapter_name: Optional[str] = None) -> Iterable[nn.Parameter]:
        name = adapter_name or self.active_adapter
        self._require(name)
        for bank in self.banks.values():
            yield from bank.adapters[name].parameters()

    def rational_parameters(self, adapter_name: Optional[str] = None) -> List[nn.Parameter]:
        name = adapter_name or self.active_adapter
        return [p for bank in self.banks.values() for p in bank.adapters[name].rational_parameters()]

    # ------------------------------------------------------------------ calls
    def _begin(self, batch: int, adapter_names, attention_mask, prompt_mask, prompt_lengths,
               reuse: bool):
        if self._disabled:
            names = [None] * batch
        elif adapter_names is None:
            names = [self.active_adapter] * batch
        else:
            names = list(adapter_names)
            if len(names) != batch:
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has "
                                 f"{batch} rows; give one name (or None / '__base__') per row")
        index = {n: i for i, n in enumerate(self.peft_config)}
        ids, poolings = [], []
        for n in names:
            if n in BASE_NAMES:
                ids.append(-1)
                poolings.append(None)
                continue
            if n not in index:
                raise ValueError(f"unknown adapter {n!r} in adapter_names; this model has "
                                 f"{list(self.peft_config)} (None or '__base__' for the base model)")
            ids.append(index[n])
            poolings.append(self.peft_config[n].pooling)
        mask = None if attention_mask is None else attention_mask.bool()
        if prompt_lengths is not None:
            if prompt_mask is not None:
                raise ValueError("give prompt_mask or prompt_lengths, not both")
            if attention_mask is None:
                raise ValueError("prompt_lengths needs attention_mask (to find the real tokens)")
            lengths = torch.as_tensor(prompt_lengths, device=mask.device).view(-1, 1)
            prompt_mask = mask & (mask.long().cumsum(1) <= lengths)
        if prompt_mask is not None:
            prompt_mask = prompt_mask.bool()
            mask = prompt_mask if mask is None else mask & prompt_mask
        self._ctx.begin(ids, poolings, mask, reuse)

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        if input_ids is not None:
            return input_ids.shape[0]
        if kwargs.get("inputs_embeds") is not None:
            return kwargs["inputs_embeds"].shape[0]
        raise ValueError("pass input_ids or inputs_embeds")

    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None,
                prompt_mask=None, prompt_lengths=None, **kwargs):
        """The base model's forward; adapter_names gives each row's adapter (None or
        '__base__': base model), prompt_mask [B, T] / prompt_lengths [B] restrict pooling to
        the instruction part (the loss still covers the whole sequence)."""
        self._begin(self._batch_size(input_ids, kwargs), adapter_names, attention_mask,
                    prompt_mask, prompt_lengths, reuse=False)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               **kwargs)

    def generate(self, input_ids=None, attention_mask=None, adapter_names=None, **kwargs):
        """HF generate; each row's vectors come from its prompt at prefill and are reused for
        every generated token."""
        self._begin(self._batch_size(input_ids, kwargs), adapter_names, attention_mask, None,
                    None, reuse=True)
        try:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            **kwargs)
        finally:
            self._ctx.reuse = False

    @property
    def vector_computations(self) -> int:
        """How many times a layer computed PEDRO vectors (a counter, for tests and profiling)."""
        return self._ctx.vector_computations

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Checkpoint the base model's decoder layers. Non-reentrant by default: the generator
        parameters are the only ones that need gradients, and the layers recompute their
        vectors from the same call's settings during backward."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    # ------------------------------------------------------------------ parameters
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

    # ------------------------------------------------------------------ save / load
    def adapter_state_dict(self, adapter_name: str) -> Dict[str, torch.Tensor]:
        self._require(adapter_name)
        state = {}
        for idx, bank in self.banks.items():
            for key, p in bank.adapters[adapter_name].named_parameters():
                state[f"layers.{idx}.{key}"] = p.detach().contiguous().cpu()
        return state

    def save_pretrained(self, save_directory: str,
                        selected_adapters: Optional[List[str]] = None) -> None:
        """adapter_config.json + adapter_model.safetensors per adapter; "default" at the top,
        other adapters in sub-folders named after them (peft's layout)."""
        from safetensors.torch import save_file

        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require(name)
            path = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(path, exist_ok=True)
            self.peft_config[name].save_pretrained(path)
            save_file(self.adapter_state_dict(name), os.path.join(path, WEIGHTS_NAME),
                      metadata={"format": "pt", "peft_type": "PEDRO"})

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config = PedroConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        file = os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {model_id!r}")
        try:
            state = load_file(file)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc
        self.add_adapter(adapter_name, config)
        try:
            expected = self.adapter_state_dict(adapter_name)
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            if missing or unexpected:
                raise ValueError(f"{file} does not fit this model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            for key, want in expected.items():
                if state[key].shape != want.shape:
                    raise ValueError(f"{file}: {key} has shape {tuple(state[key].shape)}, this "
                                     f"model needs {tuple(want.shape)}")
            with torch.no_grad():
                for idx, bank in self.banks.items():
                    for key, p in bank.adapters[adapter_name].named_parameters():
                        p.copy_(state[f"layers.{idx}.{key}"])
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable:
            self.set_adapter(adapter_name)
        self._bank_changed()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PedroModel":
        config = PedroConfig.from_pretrained(model_id)
        placeholder = "__loading__"
        pedro = cls(model, config, adapter_name=placeholder)
        try:
            pedro.load_adapter(model_id, adapter_name, is_trainable=is_trainable)
        except Exception:
            pedro.unload()
            raise
        pedro.delete_adapter(placeholder)
        pedro.set_adapter(adapter_name)
        return pedro

    # ------------------------------------------------------------------ unwrapping
    def unload(self) -> nn.Module:
        """The base model with its original Linear modules back, no PEDRO left in it."""
        for parent, attr, linear in self._wrapped:
            setattr(parent, attr, linear)
        self._wrapped = []
        self.banks = {}
        return self.base_model

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(
            "PEDRO adapters cannot be merged into the base weights: their scaling vectors are "
            "computed from each prompt, so no fixed weight change reproduces them. Use "
            "unload() to get the base model back, or keep the PedroModel for inference.")


def get_pedro_model(model: nn.Module, config: PedroConfig, adapter_name: str = "default") -> PedroModel:
    """Wrap a Hugging Face causal LM with a PEDRO adapter (peft's get_peft_model, for PEDRO)."""
    return PedroModel(model, config, adapter_name=adapter_name)
