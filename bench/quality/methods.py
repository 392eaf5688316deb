"""The compared methods: how each wraps a fresh base model and which training loop it uses.

A method's configuration is one flat dict of overrides: keys that are PedroConfig fields go to
the adapter (PEDRO methods), "r" is the rank of the LoRA methods, keys that are TrainConfig
fields go to the training loop; "prompt_blind" (PEDRO) is the study's own control below.
"""
import dataclasses
from typing import Callable, Dict, Tuple

import torch

from pedro_ext import PedroConfig, get_pedro_model
from pedro_ext.layer import PedroLayerBank
from pedro_ext.train import TrainConfig, train, train_baseline

METHODS = ("pedro", "pedro-static", "lora-qv", "lora-qvu", "ia3")
LORA_TARGETS = {"lora-qv": ["q_proj", "v_proj"], "lora-qvu": ["q_proj", "v_proj", "up_proj"]}
PEDRO_FIELDS = {f.name for f in dataclasses.fields(PedroConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# set by the study for every run, never by a method's configuration
STUDY_TRAIN_FIELDS = {"steps", "batch_size", "eval_every", "max_length", "seed", "output_dir",
                      "progress"}


def recipe_revision(method: str, config: Dict) -> int:
    """The revision of the training code a run of `method` with `config` depends on; runs of an
    earlier revision are kept in runs.jsonl but no longer count as done.
      1: the study as first run.
      2: (commit 9da1927) PEDRO's bi-level held-out steps follow the learning-rate schedule of
         the optimizer step they come after; before, they stepped a schedule of their own, so
         the rational coefficients' lr warmed up over bilevel_every times the steps and never
         decayed. Only PEDRO with rational_mode "bilevel" and trainable coefficients runs
         that code."""
    bilevel = (config.get("rational_mode", TrainConfig.rational_mode) == "bilevel"
               and config.get("rational_trainable", PedroConfig.rational_trainable))
    return 2 if method == "pedro" and bilevel else 1


def adapter_fields(method: str) -> set:
    if method == "pedro":
        return PEDRO_FIELDS | {"prompt_blind"}
    if method.startswith("pedro"):
        return PEDRO_FIELDS
    return {"r"} if method in LORA_TARGETS else set()


def split_config(method: str, config: Dict) -> Tuple[Dict, Dict]:
    """(adapter overrides, TrainConfig overrides) of a flat configuration."""
    ambiguous = PEDRO_FIELDS & TRAIN_FIELDS
    adapter, training = {}, {}
    for key, value in config.items():
        if key in ambiguous:
            raise ValueError(f"config key {key!r} is both a PedroConfig and a TrainConfig field")
        if key in STUDY_TRAIN_FIELDS:
            raise ValueError(f"config key {key!r} is set by the study's task, not by a method")
        if key in adapter_fields(method):
            adapter[key] = value
        elif key in TRAIN_FIELDS:
            training[key] = value
        else:
            raise ValueError(f"{method}: unknown config key {key!r} (PEDRO methods take "
                             "PedroConfig fields, LoRA 'r', every method TrainConfig fields)")
    if method in LORA_TARGETS and "r" not in adapter:
        raise ValueError(f"{method}: the config must give the LoRA rank 'r'")
    return adapter, training


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params_per_rank(model: torch.nn.Module, targets) -> int:
    """Trainable parameters of a rank-1 LoRA on `targets` (in + out features per module)."""
    return sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


class BlindPedroLayerBank(PedroLayerBank):
    """A layer bank whose generator input is a vector of ones (RMS 1, like the RMS-normalised
    pooled prompt) for every row, whatever the prompt."""

    def _pooled(self, x, plan, bank, gather):
        return torch.ones(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)


def blind_generators(net: torch.nn.Module) -> None:
    """The control for PEDRO's prompt dependence: every layer's generator gets the same input
    instead of the pooled prompt, so the vectors, b_up + w_up R(w_down 1 + b_down), are the same
    for every prompt while the parameters, their initialisation and their optimisation (the
    bi-level rational coefficients included) are PEDRO's. PEDRO-static differs from PEDRO in all
    of these. The banks change class (as precision.py's Linear layers do), so copies and pickles
    of the model stay blind."""
    banks = [m for m in net.modules() if type(m) is PedroLayerBank]
    if not banks:
        raise ValueError("blind_generators: the model has no PEDRO layer banks")
    for bank in banks:
        bank.__class__ = BlindPedroLayerBank


def build(method: str, model: torch.nn.Module, adapter: Dict
          ) -> Tuple[torch.nn.Module, Callable, Dict]:
    """(trainable model, fit function, the adapter's full hyperparameters); `adapter`: the
    adapter part of split_config.

    fit(model, tokenizer, train_pairs, dev_pairs, TrainConfig) -> summary (pedro_ext.train)."""
    import peft
    if method in ("pedro", "pedro-static"):
        adapter = dict(adapter)
        blind = adapter.pop("prompt_blind", False)
        cfg = PedroConfig(**adapter)
        net = get_pedro_model(model, cfg)
        hyper = {k: v for k, v in cfg.to_dict().items() if k in PEDRO_FIELDS}
        if method == "pedro":
            if blind:
                blind_generators(net)
                hyper["prompt_blind"] = True
            return net, train, hyper
        # The control: only the static vectors b_up are trained. w_up stays 0, so every
        # prompt gets the same vector 1 + b_up: IA3 on q, v and up.
        for name, p in net.named_parameters():
            p.requires_grad_(name.endswith(".b_up"))
        return net, train_baseline, {**hyper, "trained": "b_up only"}
    if method in LORA_TARGETS:
        lora_rank = adapter["r"]
        cfg = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                              target_modules=LORA_TARGETS[method], task_type="CAUSAL_LM")
        hyper = dict(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                     target_modules=LORA_TARGETS[method])
        return peft.get_peft_model(model, cfg), train_baseline, hyper
    if method == "ia3":
        net = peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM"))
        cfg = net.peft_config["default"]
        hyper = dict(target_modules=sorted(cfg.target_modules),
                     feedforward_modules=sorted(cfg.feedforward_modules))
        return net, train_baseline, hyper
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
