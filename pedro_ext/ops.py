"""Python front of the pedro_ext custom ops: the public functions, their fake (meta) kernels
for torch.compile, and autograd. The kernels and the argument checks live in csrc/."""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.pedro_ext


def _check_one_device(op: str, **tensors) -> None:
    # The C++ checks cover this too, but a CPU tensor mixed with a meta or CUDA tensor would be
    # dispatched to the other device's kernel first; say plainly what is wrong instead.
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"pedro_ext.{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; all arguments must be on one device")


def rational(x: Tensor, rat_num: Tensor, rat_den: Tensor) -> Tensor:
    """Elementwise safe Pade unit with one coefficient set.

    Semantics:
        x [...], rat_num [m+1] = c0..cm, rat_den [n] = d1..dn, all one dtype and device
        P = sum(c[j] * x**j for j in range(m + 1))
        A = sum(d[k - 1] * x**k for k in range(1, n + 1))
        return P / (1 + abs(A))          # evaluated in fp32 (fp64 for float64)
    Gradients reach x, rat_num and rat_den; sign(0) is taken as 0 (torch.abs' convention).
    """
    _check_one_device("rational", x=x, rat_num=rat_num, rat_den=rat_den)
    return _ops.rational.default(x, rat_num, rat_den)


def generate(pooled: Tensor, adapter_ids: Tensor, w_down: Tensor, b_down: Tensor,
             rat_num: Tensor, rat_den: Tensor, w_up: Tensor, b_up: Tensor) -> Tensor:
    """PEDRO vector generator for a batch where each request picks its adapter from a bank.

    Semantics:
        pooled [B, d]; adapter_ids [B] int32/int64 in [-1, N); w_down [N, d, r]; b_down [N, r]
        rat_num [N, m+1]; rat_den [N, n]; w_up [N, r, D]; b_up [N, D]  ->  vectors [B, D]
        for b in range(B):
            a = adapter_ids[b]
            if a == -1: vectors[b] = 1; continue            # no adapter: identity
            z = pooled[b] @ w_down[a] + b_down[a]            # [r]
            h = R_a(z)                                       # rational(z, rat_num[a], rat_den[a])
            vectors[b] = 1 + h @ w_up[a] + b_up[a]           # [D]
    The bank is gathered by index inside the kernel (no [B, d, r] copy). w_up / b_up may be
    column slices of wider tensors (the Q, V or up part of a generator). Gradients reach pooled
    and every bank tensor; a bank entry used by several requests sums their gradients in a fixed
    order, so backward is bitwise reproducible.
    """
    _check_one_device("generate", pooled=pooled, adapter_ids=adapter_ids, w_down=w_down,
                      b_down=b_down, rat_num=rat_num, rat_den=rat_den, w_up=w_up, b_up=b_up)
    return _ops.generate.default(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up,
                                 b_up)


def modulate(x: Tensor, vectors: Tensor, seq_ids: Optional[Tensor] = None) -> Tensor:
    """Scale every token of a request by that request's vector.

    Semantics:
        padded: x [B, T, D], vectors [B, D]      ->  x * vectors[:, None, :]
        packed: x [S, D], seq_ids [S] in [0, B)  ->  x * vectors[seq_ids]
    vectors may be a column slice of a wider tensor (row stride > D). Products are taken in
    fp32 and rounded once. This is PEDRO's whole per-token cost at decode time.
    """
    _check_one_device("modulate", x=x, vectors=vectors, seq_ids=seq_ids)
    return _ops.modulate.default(x, vectors, seq_ids)


def generate_and_modulate(x: Tensor, pooled: Tensor, adapter_ids: Tensor, w_down: Tensor,
                          b_down: Tensor, rat_num: Tensor, rat_den: Tensor, w_up: Tensor,
                          b_up: Tensor, seq_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused prefill: generate (a slice of) the vectors and apply them to the prompt's tokens.

    Semantics:
        vectors = generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
        return modulate(x, vectors, seq_ids), vectors     # keep `vectors` for decoding
    Pass w_up[:, :, c0:c1] and b_up[:, c0:c1] to produce and apply one slice (e.g. l_q).
    On CUDA this is two launches: a shrink kernel (pooled @ w_down, one block per request) and one
    expand kernel that computes each 256-column tile of the vectors, stores it, and scales every
    token of the request with it while the tile is in shared memory, so x is read once and the
    vectors are never read back from memory.
    """
    _check_one_device("generate_and_modulate", x=x, seq_ids=seq_ids, pooled=pooled,
                      adapter_ids=adapter_ids, w_down=w_down, b_down=b_down, rat_num=rat_num,
                      rat_den=rat_den, w_up=w_up, b_up=b_up)
    return _ops.generate_and_modulate.default(x, seq_ids, pooled, adapter_ids, w_down, b_down,
                                              rat_num, rat_den, w_up, b_up)


# ----------------------------------------------------------------------- fake kernels
@torch.library.register_fake("pedro_ext::rational")
def _rational_fake(x, rat_num, rat_den):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pedro_ext::rational_backward")
def _rational_backward_fake(grad, x, rat_num, rat_den):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(rat_num, memory_format=torch.contiguous_format),
            torch.empty_like(rat_den, memory_format=torch.contiguous_format))


@torch.library.register_fake("pedro_ext::generate")
def _generate_fake(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up):
    return pooled.new_empty(pooled.shape[0], w_up.shape[2])


@torch.library.register_fake("pedro_ext::generate_backward")
def _generate_backward_fake(grad, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up):
    n, r, big_d = w_up.shape
    return (pooled.new_empty(pooled.shape), w_down.new_empty(w_down.shape),
            b_down.new_empty(b_down.shape), rat_num.new_empty(rat_num.shape),
            rat_den.new_empty(rat_den.shape), w_up.new_empty(n, r, big_d),
            w_up.new_empty(n, big_d))


@torch.library.register_fake("pedro_ext::modulate")
def _modulate_fake(x, vectors, seq_ids):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pedro_ext::modulate_backward_vectors")
def _modulate_backward_vectors_fake(grad, x, seq_ids, num_seqs):
    return x.new_empty(num_seqs, x.shape[-1])


@torch.library.register_fake("pedro_ext::generate_and_modulate")
def _generate_and_modulate_fake(x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num,
                                rat_den, w_up, b_up):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            pooled.new_empty(pooled.shape[0], w_up.shape[2]))


# ----------------------------------------------------------------------- autograd
def _rational_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rational_backward(ctx, grad):
    x, rat_num, rat_den = ctx.saved_tensors
    return _ops.rational_backward.default(grad, x, rat_num, rat_den)


def _generate_setup(ctx, inputs, output):
    pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, _ = inputs
    ctx.save_for_backward(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up)


def _generate_grads(ctx, grad_vectors):
    pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up = ctx.saved_tensors[:7]
    g = _ops.generate_backward.default(grad_vectors, pooled, adapter_ids, w_down, b_down,
                                       rat_num, rat_den, w_up)
    g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu = g
    return g_pooled, None, g_wd, g_bd, g_num, g_den, g_wu, g_bu


def _generate_backward(ctx, grad_vectors):
    return _generate_grads(ctx, grad_vectors)


def _modulate_grads(ctx, grad, x, vectors, seq_ids):
    grad_x = _ops.modulate.default(grad, vectors, seq_ids) if ctx.needs_input_grad[0] else None
    grad_v = _ops.modulate_backward_vectors.default(grad, x, seq_ids, ctx.num_seqs)
    return grad_x, grad_v


def _gm_setup(ctx, inputs, output):
    x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, _ = inputs
    ctx.num_seqs = pooled.shape[0]
    ctx.save_for_backward(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, x,
                          seq_ids, output[1])


def _gm_backward(ctx, grad_y, grad_vectors):
    saved = ctx.saved_tensors
    grad_x, grad_v = _modulate_grads(ctx, grad_y, saved[7], saved[9], saved[8])
    if grad_vectors is not None:
        grad_v = grad_v + grad_vectors
    g_pooled, _, g_wd, g_bd, g_num, g_den, g_wu, g_bu = _generate_grads(ctx, grad_v)
    return grad_x, None, g_pooled, None, g_wd, g_bd, g_num, g_den, g_wu, g_bu


torch.library.register_autograd("pedro_ext::rational", _rational_backward,
                                setup_context=_rational_setup)
torch.library.register_autograd("pedro_ext::generate", _generate_backward,
                                setup_context=_generate_setup)
# modulate's autograd is registered in C++ (csrc/autograd.cpp): it is the per-token hot path.
torch.library.register_autograd("pedro_ext::generate_and_modulate", _gm_backward,
                                setup_context=_gm_setup)
