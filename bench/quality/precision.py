"""Fast CPU training of the frozen base model: its Linear layers multiply in bfloat16.

On the study's CPU (AMD EPYC with AVX512-BF16) a bf16 GEMM runs 4-5x faster than an fp32 one,
which is what makes a tuned, multi-seed study fit on 2 shared cores. Only the frozen base
weights and the GEMM inputs are rounded to bf16 (as torch.autocast does); every activation,
every adapter (PEDRO, LoRA, IA3) and every loss stays fp32, so the adapters' small scalings
(1 + 1e-3) are not lost in bf16 rounding. The same conversion is applied to every method.

The output head is the exception that matters for the metrics: bf16 logits carry an absolute
error of up to ~0.06 at the logit magnitudes of a confident model. The head therefore multiplies
in bf16 only while gradients are enabled (training steps) and in fp32 under torch.no_grad,
i.e. in every dev and test evaluation.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Bf16MatmulLinear(nn.Linear):
    """An nn.Linear (so peft and PEDRO wrap it as usual) whose frozen weight is used as a bf16
    copy; input and output keep their dtype. `exact_without_grad`: fp32 under no_grad."""

    exact_without_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is for frozen weights; this one is trainable")
        if self.exact_without_grad and not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.to(torch.bfloat16), self._buffers["weight_bf16"]).to(x.dtype)
        return y if self.bias is None else y + self.bias


def bf16_base_matmuls(model: nn.Module, head_name: str = "lm_head") -> nn.Module:
    """Freeze `model` and convert every plain nn.Linear in place (before attaching adapters)."""
    model.requires_grad_(False)
    converted = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            child.__class__ = Bf16MatmulLinear
            child.register_buffer("weight_bf16", child.weight.detach().to(torch.bfloat16),
                                  persistent=False)
            child.exact_without_grad = name == head_name
            converted += 1
    if converted == 0:
        raise ValueError("bf16_base_matmuls found no nn.Linear to convert")
    return model
