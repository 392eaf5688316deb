"""The routing of one PedroModel call, built once per forward / generate call (like vLLM's
punica_wrapper metadata) and read by every PEDRO layer.

A `PedroCall` holds which adapter each request uses (ids on the host, and on the device once per
device), which positions form each prompt, each row's pooling / normalisation / dropout, and the
vectors computed from the prompts (keyed by layer, with every target module's column slice cut
once). It lives in a context variable for the duration of the call, so threads and asyncio tasks
serving one model concurrently never see each other's routing and nothing outlives the call.
Gradient-checkpoint recomputation re-enters the call it belongs to (see `checkpoint_context_fn`).

Graph-captured decoding (torch.compile with a static cache, CUDA graphs) cannot read a context
variable: dynamo traces the value it sees once and never guards it. For that case the model owns
one `StaticRouting`: persistent per-layer vector tensors that a static-cache generate call
borrows under a lock, writes in place at prefill and resets at exit; compiled decode steps read
them as graph inputs, guarded by the `active` / `prefilled` flags.
"""
import contextlib
import contextvars
import functools
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("pedro_call", default=None)


# () -> Optional[PedroCall]; the context variable's own getter (read per wrapped module per step)
current_call = _CURRENT.get


@contextlib.contextmanager
def entered(call: "PedroCall"):
    """Make `call` the current routing within this block (this thread / task only)."""
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def mean_pool_weights(mask: Optional[torch.Tensor], rows: int, length: int,
                      device) -> torch.Tensor:
    """[rows, 1, T] fp32: 1 / (the row's number of positions) where mask [rows, T] is True (all
    positions if None), else 0, so that mean pooling is one batched matmul (a row without
    positions pools to zeros)."""
    if mask is None:
        return torch.full((rows, 1, length), 1.0 / length, device=device)
    m = mask.to(torch.float32)
    return (m / m.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1)


@dataclass(frozen=True)
class RowSetting:
    """How a row's adapter turns its prompt into a pooled generator input."""
    pooling: str
    norm: str
    dropout: float


@dataclass
class RowPlan:
    """A call's routing for one device and row count (generate repeats a request's row k times
    for beams / num_return_sequences)."""
    ids: torch.Tensor  # [rows] int64, -1 = base model
    gather: torch.Tensor  # ids clamped at 0, for per-row lookups of optional bank tensors
    ids_host: torch.Tensor  # ids on the CPU
    mask: Optional[torch.Tensor]  # [rows, T] bool, None = every position
    poolings: List[Tuple[str, Optional[torch.Tensor]]]  # (mode, rows [rows] bool or None = all)
    norms: List[Tuple[str, Optional[torch.Tensor]]]
    dropout: Optional[torch.Tensor]  # [rows] rates, None = no dropout
    _mean_weights: Dict[int, torch.Tensor] = field(default_factory=dict)

    def mean_weights(self, length: int) -> torch.Tensor:
        """mean_pool_weights of this plan's mask, once per call (every layer pools with it)."""
        w = self._mean_weights.get(length)
        if w is None:
            w = self._mean_weights[length] = mean_pool_weights(
                self.mask, self.ids.shape[0], length, self.ids.device)
        return w

    @functools.cached_property
    def local(self) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
        """(used, local_ids, local_gather) for a training bank that stacks only the adapters
        the rows use: their bank indices ascending, the ids as positions in that list (-1
        stays -1) and those clamped at 0. Computed on first use: serving never needs them."""
        used = torch.tensor(self.used, dtype=torch.int64)
        local = torch.where(self.ids_host < 0, -1, torch.searchsorted(used, self.ids_host))
        device = self.ids.device
        return (self.used, local.to(device, non_blocking=True),
                local.clamp(min=0).to(device, non_blocking=True))

    @functools.cached_property
    def used(self) -> List[int]:
        """The bank indices the rows read, ascending."""
        return sorted({i for i in self.ids_host.tolist() if i >= 0})


def _groups(values: Sequence[Optional[str]], device) -> List[Tuple[str, Optional[torch.Tensor]]]:
    modes = sorted({v for v in values if v is not None})
    if len(modes) <= 1:  # base rows' pooled values are never used (their vectors are ones)
        return [(m, None) for m in modes]
    return [(m, torch.tensor([v == m for v in values], device=device)) for m in modes]


class PedroCall:
    """Everything one PedroModel call needs in every layer. Checks are done here, on the host,
    once; layers run no validation of their own (the ops get check_ids=False)."""

    def __init__(self, model, ids: List[int], settings: List[Optional[RowSetting]],
                 pool_mask: Optional[torch.Tensor], reuse: bool, direct: bool = False,
                 dropout: bool = True, *, order: List[str]):
        self.model = model
        self.batch = len(ids)
        self.order = order  # the adapter order the ids index (PedroModel._order when made)
        self.ids_cpu = torch.tensor(ids, dtype=torch.int64)
        self.settings = settings
        self.any_adapter = any(s is not None for s in settings)
        self.pool_mask = pool_mask
        self.reuse = reuse  # generate: vectors computed at prefill, reused at every step
        self.direct = direct  # a direct call of the base model (peft's convention)
        self.use_dropout = dropout and any(s is not None and s.dropout > 0 for s in settings)
        self.static: Optional[StaticRouting] = None
        self.vectors: Dict[int, torch.Tensor] = {}
        self.slices: Dict[Tuple[int, int], torch.Tensor] = {}
        # Per wrapped module (the module is the key): the arguments of its eager inference path,
        # fixed by the module once this call's vectors for its layer exist (pedro_ext.layer), so
        # each later decoding step costs one lookup per module.
        self.prepared: Dict[object, tuple] = {}
        self.nested = 0  # direct calls re-entering the same model (hooks' bookkeeping)
        self.token = None
        self._plans: Dict[tuple, RowPlan] = {}

    def plan(self, x: torch.Tensor) -> RowPlan:
        rows, device = x.shape[0], x.device
        key = (device, rows)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if rows % self.batch:
            raise RuntimeError(
                f"PEDRO: the model saw {rows} rows but the call was set up for {self.batch} "
                "requests; call the PedroModel (not its base model) for every forward / generate")
        k = rows // self.batch
        ids = self.ids_cpu.repeat_interleave(k)
        settings = [s for s in self.settings for _ in range(k)]
        mask = None
        if self.pool_mask is not None:
            mask = self.pool_mask.to(device).repeat_interleave(k, dim=0)
        dropout = None
        if self.use_dropout:
            dropout = torch.tensor([s.dropout if s else 0.0 for s in settings], device=device)
        plan = RowPlan(ids=ids.to(device, non_blocking=True),
                       gather=ids.clamp(min=0).to(device, non_blocking=True), ids_host=ids,
                       mask=mask,
                       poolings=_groups([s and s.pooling for s in settings], device),
                       norms=_groups([s and s.norm for s in settings], device), dropout=dropout)
        self._plans[key] = plan
        return plan

    def store(self, layer: int, vectors: torch.Tensor, slots: Sequence[Tuple[int, int]]) -> None:
        """Keep a layer's vectors [rows, D] and cut each target module's columns once."""
        if self.static is not None:
            vectors = self.static.store(layer, vectors)
        self.vectors[layer] = vectors
        for slot, (start, end) in enumerate(slots):
            self.slices[(layer, slot)] = vectors[:, start:end]


class _ThreadFlags(threading.local):
    def __init__(self):
        self.active = self.prefilled = self.any_adapter = False


class StaticRouting:
    """Persistent routing tensors for graph-captured decode steps (one per PedroModel).

    A static-cache generate call holds `lock` for its whole duration (such calls on one model
    run one at a time, as HF's compiled forward and static cache require anyway), writes each
    layer's vectors into a persistent [rows, D] tensor at prefill (in place when the shape
    allows, so CUDA graphs see fixed addresses), and resets them to the identity on exit.
    Compiled code reads `vectors` only while `active and prefilled` and the call has an adapter
    row (`any_adapter`: a call without one computes no vectors, so the buffers may still have
    another call's shape); dynamo guards the flags, so a graph traced for one state is never
    replayed in another."""

    def __init__(self):
        self.lock = threading.Lock()
        self.flags = _ThreadFlags()
        self.vectors: Dict[int, torch.Tensor] = {}

    # The flags are per thread: only the thread running the static-cache call sees them set, so
    # a compiled call on another thread meanwhile takes its own (eager) routing. Dynamo's guards
    # read them in the calling thread.
    active = property(lambda self: self.flags.active,
                      lambda self, v: setattr(self.flags, "active", v))
    prefilled = property(lambda self: self.flags.prefilled,
                         lambda self, v: setattr(self.flags, "prefilled", v))
    any_adapter = property(lambda self: self.flags.any_adapter,  # the call has an adapter row
                           lambda self, v: setattr(self.flags, "any_adapter", v))

    def __getstate__(self):  # (copy / pickle: a lock and thread-local flags are neither)
        state = dict(self.__dict__)
        del state["lock"], state["flags"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, lock=threading.Lock(), flags=_ThreadFlags())

    def store(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        buf = self.vectors.get(layer)
        if buf is None or buf.shape != vectors.shape or buf.dtype != vectors.dtype \
                or buf.device != vectors.device:
            buf = torch.empty_like(vectors)
            self.vectors[layer] = buf
        with torch.no_grad():
            buf.copy_(vectors)
        return buf

    @contextlib.contextmanager
    def borrowed(self, call: PedroCall):
        with self.lock:
            call.static = self
            self.active, self.prefilled, self.any_adapter = True, False, call.any_adapter
            try:
                yield
            finally:
                self.active, self.prefilled, self.any_adapter = False, False, False
                with torch.no_grad():
                    for buf in self.vectors.values():
                        buf.fill_(1.0)


def checkpoint_context_fn(user_context_fn=None):
    """A `context_fn` for torch.utils.checkpoint (non-reentrant) that re-enters the PedroCall
    current at checkpoint time during recomputation, which may run after the call returned and
    on another thread (the autograd engine's device threads)."""

    def context_fn():
        call = _CURRENT.get()
        forward_ctx, recompute_ctx = (user_context_fn() if user_context_fn is not None
                                      else (contextlib.nullcontext(), contextlib.nullcontext()))
        return forward_ctx, _recompute(call, recompute_ctx)

    context_fn.pedro_reenters_call = True
    return context_fn


@contextlib.contextmanager
def _recompute(call, inner):
    with inner, entered(call):
        yield
