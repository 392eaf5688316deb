"""Llama-family MLPs with PEDRO's FFN-up scaling fused into the activation product:
down(act(gate(x)) * up(x) * l_u) with one act_mul_modulate op, so scaling U adds no pass over
the [B, T, intermediate] activations. Other MLPs keep the unfused path (up_proj's PedroLinear
scales its own output)."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import layer as _layer
from .layer import PedroLinear

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# act_fn classes (transformers.activations) computing exactly F.silu / F.gelu(approximate="tanh")
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh"}


def fused_activation(mlp: nn.Module) -> Optional[str]:
    """The act_mul_modulate activation for this MLP, or None if it cannot be fused."""
    if type(mlp).__name__ not in FUSABLE_MLPS or "forward" in vars(mlp):
        return None
    if not all(isinstance(getattr(mlp, n, None), nn.Module)
               for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    if not isinstance(mlp.up_proj, PedroLinear):
        return None
    name = _ACTIVATIONS.get(type(mlp.act_fn).__name__)
    if name == "gelu_tanh" and not isinstance(getattr(mlp.act_fn, "act", None), functools.partial):
        return None  # GELUTanh(use_gelu_tanh_python=True) rounds differently from F.gelu
    return name


def fuse(mlp: nn.Module, activation: str) -> None:
    """Give `mlp` the fused forward (an instance attribute; `unfuse` removes it)."""
    mlp.pedro_activation = activation
    mlp.forward = functools.partial(_fused_forward, mlp)  # (a partial copies and pickles)


def unfuse(mlp: nn.Module) -> None:
    vars(mlp).pop("forward", None)
    vars(mlp).pop("pedro_activation", None)


def _fused_forward(mlp: nn.Module, x):
    """down(act(gate(x)) * up(x) * l_u), scaling U inside the activation product. In eager
    mode a generate call's decoding steps take the arguments fixed at the MLP's first run
    (pedro_ext.layer.settled)."""
    if torch.compiler.is_compiling():
        return _compiled_forward(mlp, x)
    call = _layer.current_call()
    prepared = None if call is None else call.prepared.get(mlp)
    if prepared is None:
        return _forward_and_settle(mlp, call, x)
    gate, up, down, v, act_mul_modulate = prepared
    h = act_mul_modulate(F.linear(x, *gate), F.linear(x, *up), v, None, mlp.pedro_activation,
                         False)
    return F.linear(h, *down)


def _forward_and_settle(mlp: nn.Module, call, x):
    up_proj = mlp.up_proj
    v = _layer._call_vectors(up_proj, x, call)
    gate, up = mlp.gate_proj(x), _layer.base_output(up_proj.base_layer, x)
    if v is None:
        return mlp.down_proj(mlp.act_fn(gate) * up)
    v = _layer.in_dtype_of(up, v)
    h = _layer._ACTIVE.table["act_mul_modulate"](gate, up, v, None, mlp.pedro_activation, False)
    if _layer.settled(call, up_proj.layer, h, v):
        linears = [_layer.plain_linear(m) for m in (mlp.gate_proj, up_proj.base_layer,
                                                    mlp.down_proj)]
        if None not in linears:
            call.prepared[mlp] = (*linears, v, _layer._ACTIVE.table["act_mul_modulate"])
    return mlp.down_proj(h)


def _compiled_forward(mlp: nn.Module, x):
    up_proj = mlp.up_proj
    v = up_proj.vectors(x)
    gate, up = mlp.gate_proj(x), up_proj.base_layer(x)
    if v is None:
        return mlp.down_proj(mlp.act_fn(gate) * up)
    v = _layer.in_dtype_of(up, v)
    if _layer.traced_products():  # one fused inductor kernel (layer.traced_scale)
        return mlp.down_proj(_layer.traced_scale(mlp.act_fn(gate) * up, v))
    h = _layer._ACTIVE.table["act_mul_modulate"](gate, up, v, None, mlp.pedro_activation, False)
    return mlp.down_proj(h)
