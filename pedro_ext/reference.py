"""Pure-PyTorch PEDRO ops, written for clarity: the independent reference the kernels are
tested against. Differentiable with ordinary autograd. Computes in float32 (float64 for
float64 inputs) and rounds once to the input dtype, like the kernels (act_mul_modulate: like
eager torch, see there), except the rational unit: the plain formula in float64, where its
powers (z^9 in the gradients) do not overflow for |z| up to ~1e30 (the kernels evaluate it in
float32 with the terms scaled, see csrc/rational.h). Invalid ids follow the
kernels' rule (see pedro_ext.ops): the output they select is a constant NaN (torch.where, so
no gradient flows through it).
"""
import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rational_eval(z: torch.Tensor, rat_num: torch.Tensor, rat_den: torch.Tensor) -> torch.Tensor:
    """R(z) = (c0 + c1 z + ... + cm z^m) / (1 + |d1 z + ... + dn z^n|).

    rat_num [..., m+1] and rat_den [..., n] broadcast against z along their leading dims."""
    p = torch.zeros_like(z)
    for j in reversed(range(rat_num.shape[-1])):
        p = p * z + rat_num[..., j]
    a = torch.zeros_like(z)
    for k in reversed(range(rat_den.shape[-1])):
        a = a * z + rat_den[..., k]
    return p / (1 + (a * z).abs())


def rational(x: torch.Tensor, rat_num: torch.Tensor, rat_den: torch.Tensor) -> torch.Tensor:
    return rational_eval(x.double(), rat_num.double(), rat_den.double()).to(x.dtype)


def generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up) -> torch.Tensor:
    acc = _acc_dtype(pooled.dtype)
    n = w_down.shape[0]
    ids = adapter_ids.long()
    valid = (ids >= -1) & (ids < n)
    has_adapter = valid & (ids >= 0)
    shape = (pooled.shape[0], w_up.shape[2])
    ones = torch.ones(shape, dtype=acc, device=pooled.device)
    if n == 0:  # empty bank: every row is "no adapter" or invalid
        v = ones
    else:
        a = torch.where(has_adapter, ids, 0)
        z = torch.einsum("bd,bdr->br", pooled.to(acc), w_down[a].to(acc)) + b_down[a].to(acc)
        h = rational_eval(z.double(), rat_num[a].double().unsqueeze(1),
                          rat_den[a].double().unsqueeze(1)).to(acc)
        v = 1 + torch.einsum("br,brD->bD", h, w_up[a].to(acc)) + b_up[a].to(acc)
        v = torch.where(has_adapter.unsqueeze(1), v, ones)
    v = torch.where(valid.unsqueeze(1), v, torch.full_like(v, float("nan")))
    return v.to(pooled.dtype)


def _rows_of(x, vectors, seq_ids):
    """vectors broadcast against x's rows, and which rows are valid (None: all). Invalid rows
    read ones instead (through torch.where: no gradient reaches vectors, and a NaN vector of
    another request cannot leak into their gradient)."""
    if seq_ids is None:
        return vectors.unsqueeze(1), None  # [B, 1, D] against x [B, T, D]
    s = seq_ids.long()
    valid = ((s >= 0) & (s < vectors.shape[0])).unsqueeze(1)
    ones = torch.ones(x.shape, dtype=vectors.dtype, device=x.device)
    if vectors.shape[0] == 0:  # no request: every row is invalid
        return ones, valid
    return torch.where(valid, vectors[torch.where(valid[:, 0], s, 0)], ones), valid


def _where_valid(out, valid):
    return out if valid is None else torch.where(valid, out, torch.full_like(out, float("nan")))


def modulate(x: torch.Tensor, vectors: torch.Tensor, seq_ids=None) -> torch.Tensor:
    acc = _acc_dtype(x.dtype)
    per_row, valid = _rows_of(x, vectors, seq_ids)
    return _where_valid(x.to(acc) * per_row.to(acc), valid).to(x.dtype)


def modulate_(x: torch.Tensor, vectors: torch.Tensor, seq_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return x.copy_(modulate(x, vectors, seq_ids))


def activation_fn(name: str):
    """The gated-MLP activations of act_mul_modulate, as torch defines them."""
    return {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}[name]


def act_mul_modulate(gate, up, vectors, seq_ids=None, activation="silu") -> torch.Tensor:
    """(act(gate) * up) * vectors[row] with eager torch's ops in the inputs' dtype: for half types
    act and each product are rounded to the dtype, like the bare MLP's act(gate) * up."""
    per_row, valid = _rows_of(gate, vectors, seq_ids)
    return _where_valid(activation_fn(activation)(gate) * up * per_row, valid)


def generate_and_modulate(x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num, rat_den,
                          w_up, b_up):
    vectors = generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
    return modulate(x, vectors, seq_ids), vectors
