"""Pure-PyTorch PEDRO ops, written for clarity: the independent reference the kernels are
tested against. Differentiable with ordinary autograd. Computes in float32 (float64 for
float64 inputs) and rounds once to the input dtype, like the kernels.
"""
import torch


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
    acc = _acc_dtype(x.dtype)
    return rational_eval(x.to(acc), rat_num.to(acc), rat_den.to(acc)).to(x.dtype)


def generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up) -> torch.Tensor:
    acc = _acc_dtype(pooled.dtype)
    ids = adapter_ids.long()
    has_adapter = ids >= 0
    a = ids.clamp(min=0)
    if w_down.shape[0] == 0:  # empty bank: every row must be "no adapter"
        return torch.ones(pooled.shape[0], w_up.shape[2], dtype=pooled.dtype, device=pooled.device)
    z = torch.einsum("bd,bdr->br", pooled.to(acc), w_down[a].to(acc)) + b_down[a].to(acc)
    h = rational_eval(z, rat_num[a].to(acc).unsqueeze(1), rat_den[a].to(acc).unsqueeze(1))
    v = 1 + torch.einsum("br,brD->bD", h, w_up[a].to(acc)) + b_up[a].to(acc)
    v = torch.where(has_adapter.unsqueeze(1), v, torch.ones_like(v))
    return v.to(pooled.dtype)


def modulate(x: torch.Tensor, vectors: torch.Tensor, seq_ids=None) -> torch.Tensor:
    acc = _acc_dtype(x.dtype)
    if seq_ids is None:
        per_row = vectors.unsqueeze(1)  # [B, 1, D] against x [B, T, D]
    else:
        per_row = vectors[seq_ids.long()]  # [S, D] against x [S, D]
    return (x.to(acc) * per_row.to(acc)).to(x.dtype)


def generate_and_modulate(x, seq_ids, pooled, adapter_ids, w_down, b_down, rat_num, rat_den,
                          w_up, b_up):
    vectors = generate(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up)
    return modulate(x, vectors, seq_ids), vectors
