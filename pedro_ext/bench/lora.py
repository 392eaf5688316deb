"""The LoRA baselines, in plain PyTorch, as multi-LoRA servers run them.

lora_bmm:    BGMV semantics, y[b] += scale * (x[b] @ A[idx[b]]) @ B[idx[b]], with the adapters
             gathered per request and two batched matmuls (punica's shrink / expand).
lora_peft:   peft's mixed-batch path: a Python loop over the distinct adapters in the batch,
             each selecting its rows.
lora_single: one adapter for the whole batch, two plain matmuls (LoRA's best case).
lora_bgmv:   the fused Triton shrink / expand kernels of lora_bgmv.py (GPU only).
"""
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .lora_bgmv import lora_bgmv


def lora_bmm(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             idx: torch.Tensor, scale: float) -> torch.Tensor:
    """x [B, T, d], y [B, T, out], a [N, d, r], b [N, r, out], idx [B]."""
    return y + torch.bmm(torch.bmm(x, a[idx]), b[idx]) * scale


def lora_peft(x, y, a, b, groups: Sequence[Tuple[int, torch.Tensor]], scale: float):
    """groups: (adapter index, row indices) per distinct adapter, built on the host from the
    request's adapter names as peft does."""
    y = y.clone()
    for adapter, rows in groups:
        y[rows] += (x[rows] @ a[adapter]) @ b[adapter] * scale
    return y


def lora_single(x, y, a0, b0, scale):
    return y + (x @ a0) @ b0 * scale


def row_groups(idx_cpu: torch.Tensor, device) -> List[Tuple[int, torch.Tensor]]:
    return [(int(a), (idx_cpu == a).nonzero().flatten().to(device)) for a in idx_cpu.unique()]


class BatchedLoraLinear(nn.Module):
    """A Linear plus multi-LoRA by request: kind "bmm" (gathered bmm) or "bgmv" (the fused
    Triton kernels), the lora_bmm / lora_bgmv methods at model level. holder["ids"] holds the
    adapter index of every request of the current call, on the model's device."""

    def __init__(self, base: nn.Linear, n: int, r: int, scale: float, holder: dict, seed: int,
                 kind: str):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(seed)
        dt, dev = base.weight.dtype, base.weight.device
        self.a = nn.Parameter((torch.randn(n, base.in_features, r, generator=g)
                               * base.in_features ** -0.5).to(dev, dt), requires_grad=False)
        self.b = nn.Parameter((torch.randn(n, r, base.out_features, generator=g) * 0.01).to(dev, dt),
                              requires_grad=False)
        self.scale = scale
        self.holder = holder
        self.adapt = {"bmm": lora_bmm, "bgmv": lora_bgmv}[kind]

    def forward(self, x):
        idx = self.holder["ids"]
        k = x.shape[0] // idx.shape[0]
        return self.adapt(x, self.base(x), self.a, self.b,
                          idx.repeat_interleave(k) if k > 1 else idx, self.scale)


def inject_batched_lora(model: nn.Module, targets: Sequence[str], n: int, r: int, scale: float,
                        kind: str = "bmm"):
    """Replace each target Linear with BatchedLoraLinear; returns (holder, undo)."""
    holder = {"ids": None}
    replaced = []
    for name, module in list(model.named_modules()):
        for t in targets:
            child = getattr(module, t, None)
            if isinstance(child, nn.Linear):
                setattr(module, t, BatchedLoraLinear(child, n, r, scale, holder,
                                                     seed=len(replaced), kind=kind))
                replaced.append((module, t, child))

    def undo():
        for module, t, child in replaced:
            setattr(module, t, child)

    return holder, undo
