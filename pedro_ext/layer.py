"""PEDRO's per-layer pieces: one adapter's generator weights, the per-layer bank that stacks every
adapter for the ops, pooling, and the Linear wrapper that scales a module's output."""
import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import rational_init
from . import ops, reference
from .config import PedroConfig

BANK_KEYS = ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")

# The op implementations the layers call; the benchmark swaps in the pure-PyTorch reference.
_OPS = {"generate": ops.generate, "modulate": ops.modulate}


@contextlib.contextmanager
def reference_ops():
    """Within this block PEDRO layers run pedro_ext.reference instead of the kernels."""
    saved = dict(_OPS)
    _OPS.update(generate=reference.generate, modulate=reference.modulate)
    try:
        yield
    finally:
        _OPS.update(saved)


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
        self.pooling = config.pooling
        self.dropout = config.dropout
        self.rational_trainable = config.rational_trainable

    def rational_parameters(self) -> List[nn.Parameter]:
        return [self.rat_num, self.rat_den]


class ServeContext:
    """What one forward / generate call needs to know in every layer: which adapter each row
    uses, which positions form the prompt, and whether vectors are computed once and reused
    (generate) or at every call (forward, including gradient-checkpointing recomputation)."""

    def __init__(self):
        self.ids_cpu: Optional[torch.Tensor] = None  # [B] int64, -1 = base
        self.pool_mask: Optional[torch.Tensor] = None  # [B, T] bool, or None = all positions
        self.row_pooling: List[Optional[str]] = []  # per row, None for base rows
        self.reuse = False
        self.tag = 0
        self.vector_computations = 0
        self._ids_cache: Dict[torch.device, torch.Tensor] = {}

    def begin(self, ids: List[int], poolings: List[Optional[str]], pool_mask, reuse: bool):
        self.ids_cpu = torch.tensor(ids, dtype=torch.int64)
        self.row_pooling = poolings
        self.pool_mask = pool_mask
        self.reuse = reuse
        self.tag += 1
        self._ids_cache = {}

    @property
    def any_adapter(self) -> bool:
        return any(p is not None for p in self.row_pooling)

    def rows_for(self, x: torch.Tensor):
        """Adapter ids and pool mask for the rows of x, repeated when generate expanded the
        batch (beam search / num_return_sequences repeat each request's row)."""
        b = self.ids_cpu.shape[0]
        rows = x.shape[0]
        if rows % b != 0:
            raise RuntimeError(
                f"PEDRO: the model saw {rows} rows but the call was set up for {b} requests; call "
                "the PedroModel (not its base model) for every forward / generate")
        k = rows // b
        key = (x.device, k)
        if key not in self._ids_cache:
            ids = self.ids_cpu.repeat_interleave(k).to(x.device, non_blocking=True)
            mask = None
            if self.pool_mask is not None:
                mask = self.pool_mask.to(x.device).repeat_interleave(k, dim=0)
            poolings = [p for p in self.row_pooling for _ in range(k)]
            self._ids_cache[key] = (ids, mask, poolings)
        return self._ids_cache[key]


def pool(x: torch.Tensor, mask: Optional[torch.Tensor], mode: str,
         query: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T, d] -> [B, d] over the positions where mask [B, T] is True (all if None); fp32."""
    xf = x.float()
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"PEDRO pooling: prompt mask has shape {tuple(mask.shape)} but the hidden "
                         f"states are {tuple(x.shape[:2])} (batch, positions)")
    m = mask.unsqueeze(-1)
    has_tokens = mask.any(1, keepdim=True)
    if mode == "mean":
        out = (xf * m).sum(1) / m.sum(1).clamp(min=1)
    elif mode == "last":
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


class PedroLayerBank(nn.Module):
    """All adapters of one decoder layer, stacked into the ops' [N, ...] tensors on demand
    (padded to the largest r and rational degrees, which leaves each adapter's function
    unchanged: padded w_up rows and coefficients are zero)."""

    def __init__(self, d: int, big_d: int, slots: Sequence[tuple], ctx: ServeContext):
        super().__init__()
        self.d, self.big_d = d, big_d
        self.slots = list(slots)  # (start, end) of each target module's slice
        self.adapters = nn.ModuleDict()
        self.ctx = ctx
        self.order: List[str] = []  # bank index -> adapter name (set by PedroModel)
        self.vectors: Optional[torch.Tensor] = None
        self._vectors_tag = -1
        self._cache = None  # (key, stacked dict) for inference

    def invalidate(self):
        self._cache = None
        self.vectors = None
        self._vectors_tag = -1

    def _stack(self, dtype, device):
        ws = [self.adapters[n] for n in self.order]
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
        if any(w.att_query is not None for w in ws):
            zero = torch.zeros(self.d, device=ws[0].w_down.device)
            bank["att_query"] = torch.stack(
                [w.att_query if w.att_query is not None else zero for w in ws]).to(device, dtype)
        return bank

    def stacked(self, dtype, device):
        # (grad mode first: serving under no_grad never walks a large bank's parameters)
        if torch.is_grad_enabled() and any(p.requires_grad for w in self.adapters.values()
                                           for p in w.parameters()):
            return self._stack(dtype, device)  # differentiable, rebuilt every call
        key = (dtype, device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._stack(dtype, device))
        return self._cache[1]

    def prepare(self, x: torch.Tensor) -> None:
        """Compute this layer's vectors from the generator input x [B, T, d], unless this
        generate call already did (decode steps reuse the prompt's vectors)."""
        ctx = self.ctx
        if ctx.ids_cpu is None or not ctx.any_adapter or not self.order:
            self.vectors = None
            return
        if ctx.reuse and self._vectors_tag == ctx.tag and self.vectors is not None:
            return
        ids, mask, poolings = ctx.rows_for(x)
        bank = self.stacked(x.dtype, x.device)
        pooled = self._pool(x, mask, ids, poolings, bank)
        if self.training:
            dropout = max(self.adapters[n].dropout for n in self.order)
            pooled = F.dropout(pooled, dropout, training=True) if dropout > 0 else pooled
        self.vectors = _OPS["generate"](pooled.to(x.dtype), ids, *(bank[k] for k in BANK_KEYS))
        self._vectors_tag = ctx.tag
        ctx.vector_computations += 1

    def _pool(self, x, mask, ids, poolings, bank):
        modes = sorted({p for p in poolings if p is not None})
        query = None
        if "attention" in modes:
            query = bank["att_query"][ids.clamp(min=0)]
        if len(modes) == 1:
            return pool(x, mask, modes[0], query)
        out = torch.zeros(x.shape[0], x.shape[2], device=x.device)
        for mode in modes:
            rows = torch.tensor([p == mode for p in poolings], device=x.device)
            out = torch.where(rows.unsqueeze(1), pool(x, mask, mode, query), out)
        return out


class PedroLinear(nn.Module):
    """A target Linear whose output is scaled by its slice of the layer's PEDRO vectors. The
    first target of a layer (q_proj) is the generator's source: its input is what gets pooled."""

    def __init__(self, base_layer: nn.Linear, bank: PedroLayerBank, slot: int, is_source: bool):
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.is_source = is_source
        # The bank is registered on the source module only, so its parameters appear once.
        if is_source:
            self.pedro_bank = bank
        else:
            object.__setattr__(self, "_bank_ref", bank)

    @property
    def bank(self) -> PedroLayerBank:
        return self.pedro_bank if self.is_source else self._bank_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if self.is_source:
            bank.prepare(x)
        y = self.base_layer(x)
        if bank.vectors is None:
            return y
        start, end = bank.slots[self.slot]
        v = bank.vectors[:, start:end]
        if y.dim() != 3 or y.shape[0] != v.shape[0]:
            raise RuntimeError(f"PEDRO: expected a [B, T, {end - start}] output with B = "
                               f"{v.shape[0]}, got {tuple(y.shape)}")
        return _OPS["modulate"](y, v)
