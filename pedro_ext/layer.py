"""PEDRO's per-layer pieces: one adapter's generator weights, the per-layer bank that stacks every
adapter for the ops, pooling and normalisation of the prompt, and the Linear wrapper that scales
a module's output with its slice of the current call's vectors."""
import contextlib
import math
import operator
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import rational_init
from . import ops, reference
from .config import PedroConfig
from .routing import PedroCall, RowPlan, StaticRouting, current_call, mean_pool_weights

BANK_KEYS = ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")
NORM_EPS = 1e-6
_VERSION = operator.attrgetter("_version")


def _without_check_ids(op):
    """The reference ops validate every call; they take (and ignore) the kernels' check_ids."""
    def call(*args):
        return op(*args[:-1])
    return call


# The op implementations the layers call, positionally with check_ids last (the layers' routing
# was validated on the host); the benchmark swaps in the pure-PyTorch reference. The kernels are
# the op overloads themselves: a Python wrapper per call is measurable in a decode step (90 calls).
_OPS = dict(generate=ops._ops.generate.default,
            modulate=ops._ops.modulate.default,
            modulate_=ops._ops.modulate_.default,
            act_mul_modulate=ops._ops.act_mul_modulate.default)
_REFERENCE_OPS = {name: _without_check_ids(getattr(reference, name)) for name in _OPS}


class _ActiveOps(threading.local):
    """The table this thread's layers call: the kernels unless the thread is in reference_ops()."""
    table = _OPS


_ACTIVE = _ActiveOps()


@contextlib.contextmanager
def reference_ops():
    """Within this block PEDRO layers run pedro_ext.reference instead of the kernels, in this
    thread only: a model served from other threads at the same time keeps the kernels."""
    saved = _ACTIVE.table
    _ACTIVE.table = _REFERENCE_OPS
    try:
        yield
    finally:
        _ACTIVE.table = saved


class PedroAdapterWeights(nn.Module):
    """One adapter's vector generator for one decoder layer: d -> r -> rational -> D."""

    def __init__(self, config: PedroConfig, d: int, big_d: int):
        super().__init__()
        m, n = config.rational_degrees
        num, den = rational_init(config.rational_init, m, n)
        self.w_down = nn.Parameter(torch.randn(d, config.r) * (config.init_scale / math.sqrt(d)))
        self.b_down = nn.Parameter(torch.zeros(config.r))
        self.rat_num = nn.Parameter(num.float(), requires_grad=config.rational_trainable)
        self.rat_den = nn.Parameter(den.float(), requires_grad=config.rational_trainable)
        self.w_up = nn.Parameter(torch.zeros(config.r, big_d))
        self.b_up = nn.Parameter(torch.zeros(big_d))
        self.att_query = nn.Parameter(torch.zeros(d)) if config.pooling == "attention" else None
        affine = config.pool_norm_affine and config.pool_norm != "none"
        self.norm_weight = nn.Parameter(torch.ones(d)) if affine else None
        self.norm_bias = nn.Parameter(torch.zeros(d)) if affine and config.pool_norm == "layer" \
            else None
        self.rational_trainable = config.rational_trainable

    def rational_parameters(self) -> List[nn.Parameter]:
        return [self.rat_num, self.rat_den]


def pool(x: torch.Tensor, mask: Optional[torch.Tensor], mode: str,
         query: Optional[torch.Tensor] = None,
         mean_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T, d] -> [B, d] over the positions where mask [B, T] is True (all if None); fp32,
    also under torch.autocast (which would run the attention scores in bfloat16 / float16).
    A row without any such position pools to zeros. mean_weights: mean_pool_weights(mask, ...)
    when the caller pools several tensors with one mask (a call's layers)."""
    kind = x.device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return _pool(x, mask, mode, query, mean_weights)
    with torch.autocast(kind, enabled=False):
        return _pool(x, mask, mode, query, mean_weights)


def _pool(x, mask, mode, query, mean_weights):
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"PEDRO pooling: prompt mask has shape {tuple(mask.shape)} but the hidden "
                         f"states are {tuple(x.shape[:2])} (batch, positions)")
    xf = x.float()
    if mode == "mean":
        if mean_weights is None:
            mean_weights = mean_pool_weights(mask, x.shape[0], x.shape[1], x.device)
        return torch.bmm(mean_weights, xf).squeeze(1)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    m = mask.unsqueeze(-1)
    has_tokens = mask.any(1, keepdim=True)
    if mode == "last":
        pos = torch.arange(x.shape[1], device=x.device)
        last = (mask * pos).argmax(1)
        out = xf[torch.arange(x.shape[0], device=x.device), last]
    elif mode == "max":
        out = xf.masked_fill(~m, float("-inf")).amax(1)
    elif mode == "attention":
        scores = torch.einsum("btd,bd->bt", xf, query.float()).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)
        out = torch.einsum("bt,btd->bd", weights, xf)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.where(has_tokens, out, torch.zeros_like(out))


def normalise(pooled: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, d] fp32: "none", "rms" (x / rms(x)) or "layer" ((x - mean) / std), per row; one
    fused call each (prefill runs it in every layer)."""
    if mode == "none":
        return pooled
    if mode == "layer":
        return F.layer_norm(pooled, pooled.shape[-1:], eps=NORM_EPS)
    return F.rms_norm(pooled, pooled.shape[-1:], eps=NORM_EPS)


class PedroLayerBank(nn.Module):
    """All adapters of one decoder layer, stacked into the ops' [N, ...] tensors on demand
    (padded to the largest r and rational degrees, which leaves each adapter's function
    unchanged: padded w_up rows and coefficients are zero)."""

    def __init__(self, layer: int, d: int, big_d: int, slots: Sequence[tuple]):
        super().__init__()
        self.layer = layer
        self.d, self.big_d = d, big_d
        self.slots = list(slots)  # (start, end) of each target module's slice
        self.adapters = nn.ModuleDict()
        self.order: List[str] = []  # bank index -> adapter name (set by PedroModel)
        self.computations = 0  # statistics for tests and profiling; no routing state
        self._cache = None  # (snapshot, (dtype, device), versions, stacked dict) for inference
        self._params = None  # the snapshot: (order, each adapter's parameters)

    def invalidate(self):
        self._cache = self._params = None

    # Moves and casts (.to, .half, ...) and state-dict loads (also assign=True, which replaces the
    # Parameter objects) change the weights without an in-place edit: rebuild the stack.
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.invalidate()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate()

    def __setstate__(self, state):  # copies and unpickled models hold Parameters of their own
        super().__setstate__(state)
        self.invalidate()

    def _stack(self, dtype, device, names: Sequence[str]):
        """The bank of the adapters `names`, in that order."""
        ws = [self.adapters[n] for n in names]
        r = max(w.w_down.shape[1] for w in ws)
        nl = max(w.rat_num.shape[0] for w in ws)
        dl = max(w.rat_den.shape[0] for w in ws)

        def stacked(get, pad_fn):
            return torch.stack([pad_fn(w, get(w)) for w in ws]).to(device=device, dtype=dtype)

        bank = {
            "w_down": stacked(lambda w: w.w_down, lambda w, t: F.pad(t, (0, r - t.shape[1]))),
            "b_down": stacked(lambda w: w.b_down, lambda w, t: F.pad(t, (0, r - t.shape[0]))),
            "rat_num": stacked(lambda w: w.rat_num, lambda w, t: F.pad(t, (0, nl - t.shape[0]))),
            "rat_den": stacked(lambda w: w.rat_den, lambda w, t: F.pad(t, (0, dl - t.shape[0]))),
            "w_up": stacked(lambda w: w.w_up, lambda w, t: F.pad(t, (0, 0, 0, r - t.shape[0]))),
            "b_up": stacked(lambda w: w.b_up, lambda w, t: t),
        }
        # Optional per-adapter vectors, with the neutral value for adapters that lack them.
        for key, neutral in (("att_query", 0.0), ("norm_weight", 1.0), ("norm_bias", 0.0)):
            if any(getattr(w, key) is not None for w in ws):
                fill = torch.full((self.d,), neutral, device=ws[0].w_down.device)
                bank[key] = torch.stack([getattr(w, key) if getattr(w, key) is not None else fill
                                         for w in ws]).to(device=device, dtype=torch.float32)
        return bank

    def differentiable(self) -> bool:
        # (grad mode first: serving under no_grad never walks the bank's modules)
        return torch.is_grad_enabled() and any(p.requires_grad for w in self.adapters.values()
                                               for p in w.parameters())

    def _snapshot(self) -> Tuple[List[str], List[List[nn.Parameter]]]:
        """(bank order, each index's parameters), listed once per bank change. Tied to the
        order list's identity (PedroModel sets a new list at every change), so a listing made
        by a thread that raced a change is never taken for the new order."""
        snapshot = self._params  # one read: another thread may invalidate meanwhile
        order = self.order
        if snapshot is None or snapshot[0] is not order:
            snapshot = self._params = (order, [list(self.adapters[n].parameters()) for n in order])
        return snapshot

    def stacked(self, dtype, device, used: Sequence[int]):
        """Every adapter's bank for inference, cached until a weight of an adapter in `used`
        (the bank indices a call reads) changes."""
        # Checked on the weights' version counters, for the adapters the call reads only, so a
        # prefill's cost does not grow with the number of adapters loaded: an in-place edit
        # (load_state_dict, a manual edit under no_grad) rebuilds the stack when a call reads
        # that adapter (an edit through .data has a counter of its own and is not seen). A
        # stack belongs to the snapshot it was built from, and the counters are read before
        # stacking: a stack that raced a bank change or an edit is rebuilt by the next call.
        snapshot = self._snapshot()
        order, params = snapshot
        cache = self._cache  # one read: another thread may invalidate meanwhile
        if cache is not None and cache[0] is snapshot and cache[1] == (dtype, device) and all(
                sum(map(_VERSION, params[i])) == cache[2][i] for i in used):
            return cache[3]
        versions = [sum(map(_VERSION, p)) for p in params]
        with torch.no_grad():
            cache = (snapshot, (dtype, device), versions, self._stack(dtype, device, order))
        self._cache = cache
        return cache[3]

    def compute(self, call: PedroCall, x: torch.Tensor) -> None:
        """This layer's vectors for the call's rows, from the generator input x [rows, T, d]."""
        if call.order is not self.order:
            raise RuntimeError(_BANK_CHANGED)
        plan = call.plan(x)
        if self.differentiable():
            # Training stacks the batch's adapters only (rebuilt every call): the backward then
            # writes gradients for those alone, and the others get none (no decay, no momentum
            # step), however many adapters the bank holds.
            used, ids, gather = plan.local
            bank = self._stack(x.dtype, x.device, [self.order[i] for i in used])
        else:
            bank = self.stacked(x.dtype, x.device, plan.used)
            ids, gather = plan.ids, plan.gather
        pooled = self._pooled(x, plan, bank, gather)
        if self.training and plan.dropout is not None:
            p = plan.dropout.unsqueeze(1)
            keep = torch.rand_like(pooled) >= p
            pooled = pooled * keep / (1 - p)
        vectors = _ACTIVE.table["generate"](pooled.to(x.dtype), ids,
                                            *(bank[k] for k in BANK_KEYS), False)
        call.store(self.layer, vectors, self.slots)
        self.computations += 1

    @staticmethod
    def _per_group(groups, fn, rows, width, device):
        if len(groups) == 1 and groups[0][1] is None:
            return fn(groups[0][0])
        out = torch.zeros(rows, width, device=device)
        for mode, selected in groups:
            out = torch.where(selected.unsqueeze(1), fn(mode), out)
        return out

    def _pooled(self, x, plan: RowPlan, bank, gather):
        query = bank["att_query"][gather] if "att_query" in bank else None
        pooled = self._per_group(plan.poolings, lambda mode: pool(
            x, plan.mask, mode, query, plan.mean_weights(x.shape[1]) if mode == "mean" else None),
                                 x.shape[0], x.shape[2], x.device)
        pooled = self._per_group(plan.norms, lambda mode: normalise(pooled, mode),
                                 x.shape[0], x.shape[2], x.device)
        if "norm_weight" in bank:
            pooled = pooled * bank["norm_weight"][gather]
        if "norm_bias" in bank:
            pooled = pooled + bank["norm_bias"][gather]
        return pooled


_BANK_CHANGED = (
    "PEDRO: adapters were added, deleted or moved while this call ran (another thread?); its "
    "adapter ids refer to the old set. Change adapters between calls, not during one.")
_OUTSIDE_CALL = (
    "PEDRO: a PEDRO layer ran outside any PedroModel call. Call the PedroModel or its base model "
    "(not a decoder layer on its own); with gradient checkpointing, enable it through "
    "PedroModel.gradient_checkpointing_enable, which makes the recomputation re-enter its call.")


def _call_vectors(linear: "PedroLinear", x: torch.Tensor,
                  call: Optional[PedroCall] = None) -> Optional[torch.Tensor]:
    """The module's slice of the current call's vectors (None: every row is the base model),
    computed by the layer's source module when this call has none for the layer yet."""
    if call is None:
        call = current_call()
        if call is None:
            raise RuntimeError(_OUTSIDE_CALL)
    if linear.is_source and call.any_adapter and (not call.reuse
                                                  or linear.layer not in call.vectors):
        linear.pedro_bank.compute(call, x)
    return call.slices.get(linear.key)


def settled(call: PedroCall, layer: int, y: torch.Tensor, v: Optional[torch.Tensor]) -> bool:
    """Whether a module may fix its arguments for the rest of this call (PedroCall.prepared):
    a generate call, whose vectors are computed once and reused, already holds this layer's
    (or needs none), and nothing needs a gradient. Its base Linear, hooks, weights and the op
    implementations are then read once per call, not once per decoding step."""
    return (call.reuse and (layer in call.vectors or not call.any_adapter)
            and not y.requires_grad and (v is None or not v.requires_grad))


# Compiled code outside static routing: run the lookup eagerly (a graph break, but never a
# context-variable value frozen into a graph).
_call_vectors_eager = torch.compiler.disable(_call_vectors)


class _CompiledScaling(threading.local):
    """How graphs traced in this thread scale: traced aten products (the default), or the
    custom ops as in eager (custom_ops_when_compiled: the benchmark's control). Per thread,
    so a block in one thread changes no other thread's graphs; dynamo guards it."""
    traced_products = True


_COMPILED_SCALING = _CompiledScaling()


@contextlib.contextmanager
def custom_ops_when_compiled():
    """Within this block (this thread) graphs traced by torch.compile scale with the pedro_ext
    custom ops instead of traced products (for bench/compiled_scaling_ab.py, which times both).
    Needs torch >= 2.13: older dynamo (seen with 2.11) reads the class default of a
    threading.local attribute while tracing, so the block would silently change nothing."""
    if _torch_release() < (2, 13):
        raise RuntimeError(f"pedro_ext.layer.custom_ops_when_compiled needs torch >= 2.13, found "
                           f"{torch.__version__}: its dynamo would not see the switch")
    saved = _COMPILED_SCALING.traced_products
    _COMPILED_SCALING.traced_products = False
    try:
        yield
    finally:
        _COMPILED_SCALING.traced_products = saved


def _torch_release() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def traced_products() -> bool:
    """Whether this code is being traced by torch.compile to scale with traced products."""
    return torch.compiler.is_compiling() and _COMPILED_SCALING.traced_products


def in_dtype_of(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v in y's dtype. They differ under torch.autocast (Trainer's bf16 / fp16 on a float32
    model): the projections return the autocast dtype while the vectors follow the float32
    hidden states they were generated from; the scaled output keeps the projection's dtype."""
    return v if v.dtype == y.dtype else v.to(y.dtype)


def scale(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y * v per row; in place when nothing needs a gradient (inference). Traced by
    torch.compile, the same product in aten ops (see traced_scale)."""
    if traced_products():
        return traced_scale(y, in_dtype_of(y, v))
    return eager_scale(y, v)


def eager_scale(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """scale outside torch.compile: in place unless something needs a gradient."""
    v = in_dtype_of(y, v)
    if y.requires_grad or v.requires_grad:
        return _ACTIVE.table["modulate"](y, v, None, False)
    _ACTIVE.table["modulate_"](y, v, None, False)
    return y


def traced_scale(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """modulate's padded product (y [B, T, D], v [B, D], one dtype) for compiled graphs. An
    opaque custom op costs a call and a pass over y of its own there; inductor fuses this
    product into the kernels around it (Q's rotary embedding, V's cache write, the MLP's
    activation product). One multiply per element in y's dtype, as modulate's fp32 product
    rounded once. Anything else goes to the op, which raises its argument error."""
    if y.dim() != 3 or v.dtype != y.dtype or v.shape != (y.shape[0], y.shape[2]):
        return _ACTIVE.table["modulate"](y, v, None, False)
    return y * v.unsqueeze(1)


_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def base_output(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x), through plain_linear's shortcut where it applies."""
    params = plain_linear(base)
    return base(x) if params is None else F.linear(x, *params)


def plain_linear(base: nn.Module) -> Optional[tuple]:
    """(weight, bias) when base(x) is exactly F.linear(x, weight, bias): a plain nn.Linear that
    nothing hooks, evaluated as F.linear to skip the nested nn.Module call and its attribute
    lookups (together about 2 us of a decode step's per-module cost on this project's CPU);
    None for anything else (hooks, a forward replaced on the instance or the class, a subclass
    such as a quantised or parametrised layer), which goes through the module."""
    if type(base) is nn.Linear and nn.Linear.forward is _LINEAR_FORWARD and not _hooked(base):
        return base.weight, base.bias
    return None


_LINEAR_FORWARD = nn.Linear.forward  # (a library that patches the class is honoured too)


def _hooked(module: nn.Module) -> bool:
    d = module.__dict__
    return ("forward" in d or d.get("_compiled_call_impl") is not None
            or any(d[h] for h in _MODULE_HOOKS) or _global_module_hooks())


def _global_module_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_pre_hooks or m._global_forward_hooks
                or m._global_backward_pre_hooks or m._global_backward_hooks)


class PedroLinear(nn.Module):
    """A target Linear whose output is scaled by its slice of the layer's PEDRO vectors. The
    first target of a layer (q_proj) is the generator's source: its input is what gets pooled."""

    def __init__(self, base_layer: nn.Linear, bank: PedroLayerBank, slot: int, is_source: bool,
                 static: StaticRouting):
        super().__init__()
        self.base_layer = base_layer
        self.layer, self.slot, self.key = bank.layer, slot, (bank.layer, slot)
        self.start, self.end = bank.slots[slot]
        self.is_source = is_source
        # The bank is registered on the source module only, so its parameters appear once.
        if is_source:
            self.pedro_bank = bank
        else:
            object.__setattr__(self, "_bank_ref", bank)
        object.__setattr__(self, "_static", static)

    @property
    def bank(self) -> PedroLayerBank:
        return self.pedro_bank if self.is_source else self._bank_ref

    # peft's tuner layers expose the wrapped Linear's attributes; some model code reads them.
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def vectors(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if torch.compiler.is_compiling():
            static = self._static
            if static.active and static.prefilled:
                if not static.any_adapter:  # (its buffers may be another call's shape)
                    return None
                v = static.vectors.get(self.layer)
                return None if v is None else v[:, self.start:self.end]
            return _call_vectors_eager(self, x)
        return _call_vectors(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            v = self.vectors(x)
            y = self.base_layer(x)
            return y if v is None else scale(y, v)
        # Eager: a generate call's decoding steps take the arguments this module fixed at its
        # first run (one lookup; this runs 90 times per decode step).
        call = current_call()
        prepared = None if call is None else call.prepared.get(self)
        if prepared is None:
            return self._forward_and_settle(call, x)
        weight, bias, v, modulate_ = prepared
        y = F.linear(x, weight, bias)
        if v is not None:
            modulate_(y, v, None, False)
        return y

    def _forward_and_settle(self, call: Optional[PedroCall], x: torch.Tensor) -> torch.Tensor:
        v = _call_vectors(self, x, call)
        params = plain_linear(self.base_layer)
        y = self.base_layer(x) if params is None else F.linear(x, *params)
        if v is not None:
            v = in_dtype_of(y, v)
            y = eager_scale(y, v)
        if params is not None and settled(call, self.layer, y, v):
            call.prepared[self] = (*params, v, _ACTIVE.table["modulate_"])
        return y
