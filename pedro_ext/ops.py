"""Python front of the pedro_ext custom ops: the public functions, their fake kernels for
torch.compile (which check shapes, dtypes and devices as the real kernels do), and the autograd
of the ops that are not on the per-token path. The kernels, their argument checks and the
per-token autograd live in csrc/.

Invalid ids, one rule for every op and device: adapter_ids outside [-1, N) and seq_ids outside
[0, B) raise IndexError when the op checks them (check_ids=True, the default; on CUDA that costs
one host sync, which is skipped during CUDA-graph capture and after
pedro_ext.set_cuda_index_checks(False)). Unchecked invalid ids are never dereferenced: the output
an invalid id selects (a request's vector, a token's row) is the constant NaN, and being a
constant it passes no gradient to any input.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.pedro_ext

ACTIVATIONS = ("silu", "gelu_tanh")


def rational(x: Tensor, rat_num: Tensor, rat_den: Tensor) -> Tensor:
    """Elementwise safe Pade unit with one coefficient set.

    Semantics:
        x [...], rat_num [m+1] = c0..cm, rat_den [n] = d1..dn, all one dtype and device
        P = sum(c[j] * x**j for j in range(m + 1))
        A = sum(d[k - 1] * x**k for k in range(1, n + 1))
        return P / (1 + abs(A))          # evaluated in fp32 (fp64 for float64)
    Gradients reach x, rat_num and rat_den; sign(0) is taken as 0 (torch.abs' convention).
    """
    return _ops.rational.default(x, rat_num, rat_den)


def generate(pooled: Tensor, adapter_ids: Tensor, w_down: Tensor, b_down: Tensor,
             rat_num: Tensor, rat_den: Tensor, w_up: Tensor, b_up: Tensor, *,
             check_ids: bool = True) -> Tensor:
    """PEDRO vector generator for a batch where each request picks its adapter from a bank.

    Semantics:
        pooled [B, d]; adapter_ids [B] int32/int64 in [-1, N); w_down [N, d, r]; b_down [N, r]
        rat_num [N, m+1]; rat_den [N, n]; w_up [N, r, D]; b_up [N, D]  ->  vectors [B, D]
        for b in range(B):
            a = adapter_ids[b]
            if a == -1: vectors[b] = 1; continue            # no adapter: identity
            if not 0 <= a < N: vectors[b] = nan; continue   # only with check_ids=False
            z = pooled[b] @ w_down[a] + b_down[a]            # [r]
            h = R_a(z)                                       # rational(z, rat_num[a], rat_den[a])
            vectors[b] = 1 + h @ w_up[a] + b_up[a]           # [D]
    check_ids=True raises IndexError for an id outside [-1, N); pass False when the ids were
    validated already (no host sync on CUDA). The bank is gathered by index inside the kernel
    (no [B, d, r] copy). w_up / b_up may be column slices of wider tensors (the Q, V or up part of
    a generator). Gradients reach pooled and every bank tensor (dense, the bank's shape, as
    autograd and the optimizers need: zero for unused adapters; a caller that wants to write less
    passes a bank of the batch's adapters only, with remapped ids); a bank entry used by several
    requests sums their gradients in a fixed order, so backward is bitwise reproducible. Rows
    with -1 or an invalid id pass no gradient.
    """
    return _ops.generate.default(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up,
                                 b_up, check_ids)


def modulate(x: Tensor, vectors: Tensor, seq_ids: Optional[Tensor] = None, *,
             check_ids: bool = True) -> Tensor:
    """Scale every token of a request by that request's vector.

    Semantics:
        padded: x [B, T, D], vectors [B, D]      ->  x * vectors[:, None, :]
        packed: x [S, D], seq_ids [S] in [0, B)  ->  x * vectors[seq_ids]
        a row whose seq id is outside [0, B) (only with check_ids=False) -> nan, no gradient
    vectors may be a column slice of a wider tensor (row stride > D); x may have evenly strided
    rows (e.g. a column slice of a fused projection) without a copy. Products are taken in fp32
    and rounded once. The output is a new contiguous tensor. Gradients reach x and vectors; a
    request's vector gradient sums its rows in a fixed order (bitwise reproducible).
    This is PEDRO's whole per-token cost at decode time.
    """
    return _ops.modulate.default(x, vectors, seq_ids, check_ids)


def modulate_(x: Tensor, vectors: Tensor, seq_ids: Optional[Tensor] = None, *,
              check_ids: bool = True) -> Tensor:
    """In-place modulate for inference: scales x and returns it.

    Semantics:
        x.copy_(modulate(x, vectors, seq_ids, check_ids=check_ids)); return x
    Same layouts, checks and invalid-id rule as modulate. There is no autograd: a call in grad
    mode with x or vectors requiring grad raises RuntimeError (use modulate then). x's elements
    must occupy distinct memory (RuntimeError otherwise: an expanded x, rows that overlap each
    other). vectors may share memory with x, even be a view of it: they are then read from a
    copy, as the Semantics line says. Works under torch.compile and CUDA-graph capture.
    Memory: nothing is allocated when x's rows are evenly spaced with unit column stride (any
    contiguous x, a column slice of a wider tensor, packed rows with any row stride), vectors'
    columns are contiguous and apart from x, seq_ids is contiguous (and int64 on the CPU) and
    check_ids=False. Otherwise it allocates: two temporaries of x's size when a padded x's rows
    are not evenly spaced (x.stride(0) != x.size(1) * x.stride(1), e.g. a transposed [T, B, D]
    tensor) or its columns are strided; a copy of vectors when its columns are strided or it
    shares memory with x; an int64 / contiguous copy of seq_ids; a few bytes for the id check.
    """
    _ops.modulate_.default(x, vectors, seq_ids, check_ids)
    return x


def act_mul_modulate(gate: Tensor, up: Tensor, vectors: Tensor, seq_ids: Optional[Tensor] = None,
                     activation: str = "silu", *, check_ids: bool = True) -> Tensor:
    """Fused gated-MLP scaling: act(gate) * up * vectors[row], with no pass over memory beyond
    the bare MLP's (CUDA: one fused pass; CPU: torch's own activation pass, then one pass that
    multiplies by up and scales).

    Semantics:
        act = silu (Llama, Mistral, Qwen) or gelu_tanh (Gemma: gelu with approximate="tanh")
        padded: gate, up [B, T, D], vectors [B, D]     -> act(gate) * up * vectors[:, None, :]
        packed: gate, up [S, D], seq_ids [S] in [0, B) -> act(gate) * up * vectors[seq_ids]
        a row whose seq id is outside [0, B) (only with check_ids=False) -> nan, no gradient
    Rounding: every operation in fp32 (fp64 for float64), round_T rounds to the inputs' dtype T
        y = round_T(round_T(round_T(act(gate)) * up) * v)    for T = float16, bfloat16
        y = (act(gate) * up) * v                             for T = float32, float64
    where act(gate) is bitwise what eager F.silu / F.gelu(approximate="tanh") return on gate's
    device (CPU: torch's own kernel; CUDA: torch's formulas). So with vectors of ones the result
    is bitwise eager torch's act(gate) * up: a fresh adapter leaves the MLP exactly unchanged.
    The backward computes in fp32 (fp64) without the intermediate roundings.
    This is PEDRO's FFN-up scaling (scaling up_proj's output) applied where the MLP already
    touches the tensor: down_proj(act_mul_modulate(gate_proj(x), up_proj(x), l_u)). vectors
    may be a column slice; gate and up may have evenly strided rows (e.g. halves of a fused
    gate_up projection).
    Gradients reach gate, up and vectors; a request's vector gradient sums its rows in a fixed
    order (bitwise reproducible).
    """
    return _ops.act_mul_modulate.default(gate, up, vectors, seq_ids, activation, check_ids)


def generate_and_modulate(x: Tensor, pooled: Tensor, adapter_ids: Tensor, w_down: Tensor,
                          b_down: Tensor, rat_num: Tensor, rat_den: Tensor, w_up: Tensor,
                          b_up: Tensor, seq_ids: Optional[Tensor] = None, *,
                          check_ids: bool = True) -> Tuple[Tensor, Tensor]:
    """Fused prefill: generate (a slice of) the vectors and apply them to the prompt's tokens.

    Semantics:
        vectors = generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
        return modulate(x, vectors, seq_ids), vectors     # keep `vectors` for decoding
    with both invalid-id rules (check_ids covers adapter_ids and seq_ids, one host sync on
    CUDA). Pass w_up[:, :, c0:c1] and b_up[:, c0:c1] to produce and apply one slice (e.g. l_q).
    On CUDA this is two launches: a shrink kernel (pooled @ w_down, one block per request) and one
    expand kernel that computes each 256-column tile of the vectors, stores it, and scales the
    request's tokens with it while the tile is in shared memory (a request's tokens are spread
    over several blocks), so x is read once and the vectors are never read back from memory.
    """
    return _ops.generate_and_modulate.default(x, seq_ids, pooled, adapter_ids, w_down, b_down,
                                              rat_num, rat_den, w_up, b_up, check_ids)


# ----------------------------------------------------------------------- fake kernels
# The checks of csrc/checks.cpp, in the same words, for fake (meta) tensors: torch.compile and
# meta-device calls fail at the call with a clear message instead of deep inside a graph.
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _float(op, name, t):
    torch._check_type(t.dtype in _FLOATS, lambda: f"pedro_ext.{op}: {name} must be float32, "
                      f"float16, bfloat16 or float64, got {t.dtype}")


def _like(op, name, t, ref, ref_name):
    torch._check_value(t.device == ref.device, lambda: f"pedro_ext.{op}: {name} is on {t.device} "
                       f"but {ref_name} is on {ref.device}; all arguments must be on one device")
    torch._check_type(t.dtype == ref.dtype, lambda: f"pedro_ext.{op}: {name} has dtype {t.dtype} "
                      f"but {ref_name} has dtype {ref.dtype}; all floating-point arguments must "
                      "share one dtype")


def _dims(op, name, t, dims, layout):
    torch._check_value(t.dim() == dims, lambda: f"pedro_ext.{op}: {name} must be {dims}-D "
                       f"{layout}, got shape {list(t.shape)}")


def _size(op, name, t, dim, expected, what):
    torch._check_value(t.shape[dim] == expected, lambda: f"pedro_ext.{op}: {name}.size({dim}) is "
                       f"{what} and must be {expected}, got shape {list(t.shape)}")


def _index(op, name, ids, ref, ref_name, length):
    torch._check_value(ids.device == ref.device, lambda: f"pedro_ext.{op}: {name} is on "
                       f"{ids.device} but {ref_name} is on {ref.device}; all arguments must be on "
                       "one device")
    torch._check_type(ids.dtype in _INDEX, lambda: f"pedro_ext.{op}: {name} must be int32 or "
                      f"int64, got {ids.dtype}")
    torch._check_value(ids.dim() == 1 and ids.shape[0] == length, lambda: f"pedro_ext.{op}: "
                       f"{name} must be 1-D of length {length}, got shape {list(ids.shape)}")


def _check_rational(op, x, rat_num, rat_den):
    _float(op, "x", x)
    _like(op, "rat_num", rat_num, x, "x")
    _like(op, "rat_den", rat_den, x, "x")
    _dims(op, "rat_num", rat_num, 1, "[m + 1] holding c0..cm")
    _dims(op, "rat_den", rat_den, 1, "[n] holding d1..dn")
    torch._check_value(rat_num.shape[0] >= 1, lambda: f"pedro_ext.{op}: rat_num needs at least "
                       f"one coefficient (c0), got shape {list(rat_num.shape)}")


def _check_generate(op, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up):
    _float(op, "pooled", pooled)
    _dims(op, "pooled", pooled, 2, "[B, d]")
    _dims(op, "w_down", w_down, 3, "[N, d, r]")
    big_b, d = pooled.shape
    n, r = w_down.shape[0], w_down.shape[2]
    _index(op, "adapter_ids", adapter_ids, pooled, "pooled", big_b)
    _like(op, "w_down", w_down, pooled, "pooled")
    _size(op, "w_down", w_down, 1, d, "d (pooled.size(1))")
    for name, t, dims, layout in (("b_down", b_down, 2, "[N, r]"),
                                  ("rat_num", rat_num, 2, "[N, m + 1]"),
                                  ("rat_den", rat_den, 2, "[N, n]"),
                                  ("w_up", w_up, 3, "[N, r, D]")):
        _like(op, name, t, pooled, "pooled")
        _dims(op, name, t, dims, layout)
        _size(op, name, t, 0, n, "N (w_down.size(0))")
    _size(op, "b_down", b_down, 1, r, "r (w_down.size(2))")
    torch._check_value(rat_num.shape[1] >= 1, lambda: f"pedro_ext.{op}: rat_num needs at least "
                       f"one coefficient (c0) per adapter, got shape {list(rat_num.shape)}")
    _size(op, "w_up", w_up, 1, r, "r (w_down.size(2))")
    if b_up is not None:
        _like(op, "b_up", b_up, pooled, "pooled")
        _dims(op, "b_up", b_up, 2, "[N, D]")
        _size(op, "b_up", b_up, 0, n, "N (w_down.size(0))")
        _size(op, "b_up", b_up, 1, w_up.shape[2], "D (w_up.size(2))")


def _check_layout(op, x, big_b, big_d, seq_ids, x_name="x", b_what="the number of sequences B",
                  d_what="the vector width D"):
    _float(op, x_name, x)
    if seq_ids is not None:
        _dims(op, x_name, x, 2, "[S, D] (packed, with seq_ids)")
        _index(op, "seq_ids", seq_ids, x, x_name, x.shape[0])
    else:
        _dims(op, x_name, x, 3, "[B, T, D] (padded, without seq_ids)")
        _size(op, x_name, x, 0, big_b, b_what)
    _size(op, x_name, x, x.dim() - 1, big_d, d_what)


def _check_modulate(op, x, vectors, seq_ids, x_name="x"):
    _float(op, x_name, x)
    _like(op, "vectors", vectors, x, x_name)
    _dims(op, "vectors", vectors, 2, "[B, D]")
    _check_layout(op, x, vectors.shape[0], vectors.shape[1], seq_ids, x_name,
                  "the number of sequences B (vectors.size(0))",
                  "the vector width D (vectors.size(1))")


def _same_shape(op, name, t, like, like_name):
    _like(op, name, t, like, like_name)
    torch._check_value(t.shape == like.shape, lambda: f"pedro_ext.{op}: {name} must have the "
                       f"shape of {like_name} {list(like.shape)}, got {list(t.shape)}")


def _check_act_mul(op, gate, up, vectors, seq_ids, activation):
    _check_modulate(op, gate, vectors, seq_ids, "gate")
    _same_shape(op, "up", up, gate, "gate")
    torch._check_value(activation in ACTIVATIONS, lambda: f"pedro_ext.{op}: activation must be "
                       f"'silu' or 'gelu_tanh', got '{activation}'")


def _new_rows(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("pedro_ext::rational")
def _rational_fake(x, rat_num, rat_den):
    _check_rational("rational", x, rat_num, rat_den)
    return _new_rows(x)


@torch.library.register_fake("pedro_ext::rational_backward")
def _rational_backward_fake(grad, x, rat_num, rat_den):
    _check_rational("rational_backward", x, rat_num, rat_den)
    _same_shape("rational_backward", "grad", grad, x, "x")
    return _new_rows(x), _new_rows(rat_num), _new_rows(rat_den)


@torch.library.register_fake("pedro_ext::generate")
def _generate_fake(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up,
                   check_ids=True):
    _check_generate("generate", pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
    return pooled.new_empty(pooled.shape[0], w_up.shape[2])


@torch.library.register_fake("pedro_ext::generate_backward")
def _generate_backward_fake(grad, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up):
    op = "generate_backward"
    _check_generate(op, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, None)
    n, r, big_d = w_up.shape
    torch._check_value(grad.device == pooled.device, lambda: f"pedro_ext.{op}: grad is on "
                       f"{grad.device} but pooled is on {pooled.device}; all arguments must be "
                       "on one device")
    _float(op, "grad", grad)
    torch._check_value(grad.dim() == 2 and grad.shape[0] == pooled.shape[0]
                       and grad.shape[1] == big_d, lambda: f"pedro_ext.{op}: grad must be [B, D] "
                       f"= [{pooled.shape[0]}, {big_d}], got shape {list(grad.shape)}")
    return (pooled.new_empty(pooled.shape), w_down.new_empty(w_down.shape),
            b_down.new_empty(b_down.shape), rat_num.new_empty(rat_num.shape),
            rat_den.new_empty(rat_den.shape), w_up.new_empty(n, r, big_d),
            w_up.new_empty(n, big_d))


@torch.library.register_fake("pedro_ext::modulate")
def _modulate_fake(x, vectors, seq_ids, check_ids=True):
    _check_modulate("modulate", x, vectors, seq_ids)
    return _new_rows(x)


@torch.library.register_fake("pedro_ext::modulate_")
def _modulate_inplace_fake(x, vectors, seq_ids, check_ids=True):
    _check_modulate("modulate_", x, vectors, seq_ids)


@torch.library.register_fake("pedro_ext::modulate_backward_x")
def _modulate_backward_x_fake(grad, vectors, seq_ids):
    _check_modulate("modulate_backward_x", grad, vectors, seq_ids, "grad")
    return _new_rows(grad)


@torch.library.register_fake("pedro_ext::modulate_backward_vectors")
def _modulate_backward_vectors_fake(grad, x, seq_ids, num_seqs):
    op = "modulate_backward_vectors"
    _same_shape(op, "grad", grad, x, "x")
    torch._check_value(num_seqs >= 0, lambda: f"pedro_ext.{op}: num_seqs must be >= 0, got "
                       f"{num_seqs}")
    _check_layout(op, x, num_seqs, x.shape[-1], seq_ids, "x",
                  "the number of sequences B (num_seqs)")
    return x.new_empty(num_seqs, x.shape[-1])


@torch.library.register_fake("pedro_ext::generate_and_modulate")
def _generate_and_modulate_fake(x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num,
                                rat_den, w_up, b_up, check_ids=True):
    op = "generate_and_modulate"
    _check_generate(op, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
    _like(op, "x", x, pooled, "pooled")
    _check_layout(op, x, pooled.shape[0], w_up.shape[2], seq_ids, "x",
                  "the number of sequences B (pooled.size(0))", "the vector width D (w_up.size(2))")
    return _new_rows(x), pooled.new_empty(pooled.shape[0], w_up.shape[2])


@torch.library.register_fake("pedro_ext::act_mul_modulate")
def _act_mul_modulate_fake(gate, up, vectors, seq_ids, activation, check_ids=True):
    _check_act_mul("act_mul_modulate", gate, up, vectors, seq_ids, activation)
    return _new_rows(gate)


@torch.library.register_fake("pedro_ext::act_mul_modulate_backward")
def _act_mul_modulate_backward_fake(grad, gate, up, vectors, seq_ids, activation):
    op = "act_mul_modulate_backward"
    _check_act_mul(op, gate, up, vectors, seq_ids, activation)
    _same_shape(op, "grad", grad, gate, "gate")
    return _new_rows(gate), _new_rows(gate), vectors.new_empty(vectors.shape)


# ----------------------------------------------------------------------- autograd
# modulate and act_mul_modulate (the per-token path) have theirs in csrc/autograd.cpp, which
# also makes modulate_ refuse to run where autograd would need it.
def _rational_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rational_backward(ctx, grad):
    x, rat_num, rat_den = ctx.saved_tensors
    return _ops.rational_backward.default(grad, x, rat_num, rat_den)


def _generate_setup(ctx, inputs, output):
    pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up = inputs[:7]
    ctx.save_for_backward(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up)


def _generate_grads(ctx, grad_vectors):
    pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up = ctx.saved_tensors[:7]
    return _ops.generate_backward.default(grad_vectors, pooled, adapter_ids, w_down, b_down,
                                          rat_num, rat_den, w_up)


def _generate_backward(ctx, grad_vectors):
    g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu = _generate_grads(ctx, grad_vectors)
    return g_pooled, None, g_wd, g_bd, g_num, g_den, g_wu, g_bu, None


def _gm_setup(ctx, inputs, output):
    x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up = inputs[:9]
    ctx.num_seqs = pooled.shape[0]
    ctx.save_for_backward(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, x,
                          seq_ids, output[1])


def _gm_backward(ctx, grad_y, grad_vectors):
    x, seq_ids, vectors = ctx.saved_tensors[7:]
    grad_x = (_ops.modulate_backward_x.default(grad_y, vectors, seq_ids)
              if ctx.needs_input_grad[0] else None)
    grad_v = _ops.modulate_backward_vectors.default(grad_y, x, seq_ids, ctx.num_seqs)
    if grad_vectors is not None:
        grad_v = grad_v + grad_vectors
    g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu = _generate_grads(ctx, grad_v)
    return grad_x, None, g_pooled, None, g_wd, g_bd, g_num, g_den, g_wu, g_bu, None


def _first_order_only(op: str, backward):
    """The backward ops have no derivatives of their own: a backward that builds a graph
    (create_graph=True, for second derivatives) raises instead of giving zeros."""
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (*grads, *ctx.saved_tensors)):
            raise RuntimeError(SECOND_ORDER.format(op=op))
        return backward(ctx, *grads)
    return checked


SECOND_ORDER = ("pedro_ext.{op}: second derivatives are not implemented; a backward with "
                "create_graph=True through this op would give wrong higher-order gradients. "
                "Where you need them use the pure-PyTorch ops of pedro_ext.reference (in a "
                "PedroModel: within pedro_ext.layer.reference_ops()).")

torch.library.register_autograd("pedro_ext::rational",
                                _first_order_only("rational", _rational_backward),
                                setup_context=_rational_setup)
torch.library.register_autograd("pedro_ext::generate",
                                _first_order_only("generate", _generate_backward),
                                setup_context=_generate_setup)
torch.library.register_autograd("pedro_ext::generate_and_modulate",
                                _first_order_only("generate_and_modulate", _gm_backward),
                                setup_context=_gm_setup)
