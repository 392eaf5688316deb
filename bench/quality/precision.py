"""Fast CPU training of the frozen base model: its Linear layers multiply in bfloat16.

On the study's CPU (AMD EPYC with AVX512-BF16) a bf16 GEMM runs 4-5x faster than an fp32 one,
which is what makes a tuned, multi-seed study fit on 2 shared cores. A CPU without native bf16
arithmetic (AVX2 only) runs torch's bf16 GEMM about 8x slower than fp32 (a PEDRO training step
on bbc-xl took 150 s on a 2-core AVX2 EPYC VM, two processes at once); there the same roundings
are emulated (10.5 s for that step): the bf16-rounded operands multiply in an fp32 GEMM and the
result is rounded to bf16, in the backward pass too. A native bf16 GEMM also accumulates in
fp32, so the two differ only in the order of summation (at most one bf16 step in an output,
rarely). `gemm_mode()` picks one, and every run records which. Only the frozen base weights and
the GEMM inputs are rounded to bf16 (as torch.autocast does); every activation, every adapter
(PEDRO, LoRA, IA3) and every loss stays fp32, so the adapters' small scalings (1 + 1e-3) are not
lost in bf16 rounding. The same conversion is applied to every method.

The output head is the exception that matters for the metrics: bf16 logits carry an absolute
error of up to ~0.06 at the logit magnitudes of a confident model. The head therefore multiplies
in bf16 only while gradients are enabled (training steps) and in fp32 under torch.no_grad,
i.e. in every dev and test evaluation.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

GEMM_MODES = ("native", "emulated")


def gemm_mode(cpu_flags: Optional[str] = None) -> str:
    """"native" where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16 in
    /proc/cpuinfo's flags), else "emulated". Deterministic, so workers on one machine agree."""
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpu_flags = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            cpu_flags = ""
    return "native" if {"avx512_bf16", "amx_bf16"} & set(cpu_flags.split()) else "emulated"


class _RoundedLinear(torch.autograd.Function):
    """y = bf16(bf16(x) @ W^T) with W already bf16-rounded (held in fp32), computed in fp32;
    backward: grad_x = bf16(bf16(grad_y) @ W). The roundings of autograd through
    F.linear(x.to(bf16), W_bf16).to(x.dtype); W is frozen (no grad)."""

    @staticmethod
    def forward(ctx, x, weight_rounded):
        ctx.save_for_backward(weight_rounded)
        ctx.x_dtype = x.dtype
        return _round(F.linear(_round(x), weight_rounded)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight_rounded,) = ctx.saved_tensors
        return _round(_round(grad) @ weight_rounded).to(ctx.x_dtype), None


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


class Bf16MatmulLinear(nn.Linear):
    """An nn.Linear (so peft and PEDRO wrap it as usual) whose frozen weight is used as a bf16
    copy; input and output keep their dtype. `exact_without_grad`: fp32 under no_grad.
    `emulated`: the copy is held in fp32 and multiplied by _RoundedLinear."""

    exact_without_grad = False
    emulated = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is for frozen weights; this one is trainable")
        if self.exact_without_grad and not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if self.emulated:
            y = _RoundedLinear.apply(x, self._buffers["weight_bf16"])
        else:
            y = F.linear(x.to(torch.bfloat16), self._buffers["weight_bf16"]).to(x.dtype)
        return y if self.bias is None else y + self.bias


def bf16_base_matmuls(model: nn.Module, head_name: str = "lm_head",
                      mode: str = "native") -> nn.Module:
    """Freeze `model` and convert every plain nn.Linear in place (before attaching adapters);
    mode: "native" (bf16 GEMMs) or "emulated" (the same roundings around fp32 GEMMs)."""
    if mode not in GEMM_MODES:
        raise ValueError(f"bf16_base_matmuls: mode must be one of {GEMM_MODES}, got {mode!r}")
    model.requires_grad_(False)
    converted = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            child.__class__ = Bf16MatmulLinear
            rounded = child.weight.detach().to(torch.bfloat16)
            child.register_buffer("weight_bf16", rounded.float() if mode == "emulated" else rounded,
                                  persistent=False)
            child.exact_without_grad = name == head_name
            child.emulated = mode == "emulated"
            converted += 1
    if converted == 0:
        raise ValueError("bf16_base_matmuls found no nn.Linear to convert")
    return model
