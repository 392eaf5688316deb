"""pedro_serving::refresh_vectors, the prefill half of PEDRO inside a vLLM forward pass, as a
custom op: torch.compile keeps it opaque, so it runs with each step's plan (tensor arguments)
instead of the plan seen when the graph was traced.

It is called in every layer of every step, decode-only steps included (a graph cannot skip it),
so its call is kept cheap: the op is defined with torch.library.Library and a Python kernel,
which costs about 4 us a call on this project's CPU against 10 us for the same function as a
torch.library.custom_op (whose Python wrappers run on every call)."""
from typing import Optional

import torch
from torch import Tensor

from ..layer import normalise, pool
from ..config import POOL_NORMS, POOLING_MODES
from ..ops import generate
from .step_plan import PLAN_ADAPTER, PLAN_LENGTH, PLAN_SLOT, PLAN_START

_LIB = torch.library.Library("pedro_serving", "DEF")
_LIB.define(
    "refresh_vectors(Tensor x, Tensor plan, Tensor plan_host, Tensor plan_count, "
    "Tensor pooling_codes, Tensor norm_codes, Tensor w_down, Tensor b_down, Tensor rat_num, "
    "Tensor rat_den, Tensor w_up, Tensor b_up, Tensor att_query, Tensor norm_weight, "
    "Tensor norm_bias, Tensor(a!) vec_qkv, Tensor(b!) vec_gu, int q_size, int kv_size) -> ()")
_OP = torch.ops.pedro_serving.refresh_vectors.default


def refresh_vectors(x: Tensor, plan: Tensor, plan_host: Tensor, plan_count: Tensor,
                    pooling_codes: Tensor, norm_codes: Tensor, w_down: Tensor, b_down: Tensor,
                    rat_num: Tensor, rat_den: Tensor, w_up: Tensor, b_up: Tensor,
                    att_query: Tensor, norm_weight: Tensor, norm_bias: Tensor, vec_qkv: Tensor,
                    vec_gu: Tensor, q_size: int, kv_size: int) -> None:
    """Compute the vectors of the requests whose prompts this step processes, into their rows.

    Semantics:
        x [S, d]: the step's packed generator inputs (q_proj's input, every token of the batch)
        plan [R, 4] int64 on x's device, plan_host: the same rows on the CPU, plan_count [1]
            on the CPU: rows (slot, adapter, start, length) for i < count
        pooling_codes [N], norm_codes [N] on the CPU: each adapter's pooling mode and pool_norm
            (indices into config.POOLING_MODES / config.POOL_NORMS)
        bank: w_down [N, d, r] ... att_query [N, d] (pedro_ext.generate's layout),
              norm_weight [N, d], norm_bias [N, d] (ones / zeros without an affine norm)
        vec_qkv [R+1, q + 2 kv], vec_gu [R+1, 2 I]: vector rows, updated in place
        for (slot, a, start, n) in plan[:count]:
            p = pool(x[start:start + n], mode=POOLING_MODES[pooling_codes[a]], query=att_query[a])
            p = normalise(p, POOL_NORMS[norm_codes[a]]) * norm_weight[a] + norm_bias[a]
            l = generate(p, a, bank)                       # [q + kv + I] = [l_q | l_v | l_u]
            vec_qkv[slot, :q] = l_q; vec_qkv[slot, q + kv:] = l_v; vec_gu[slot, I:] = l_u
    The K and gate columns keep their ones, so scaling the fused qkv / gate_up outputs by these
    rows scales exactly Q, V and up. Every decision (the count, the longest prompt, the modes
    present) reads the host tensors: no value of a device tensor is read, so a step, decode-only
    or not, costs no host sync on a GPU.
    """
    _OP(x, plan, plan_host, plan_count, pooling_codes, norm_codes, w_down, b_down, rat_num, rat_den,
        w_up, b_up, att_query, norm_weight, norm_bias, vec_qkv, vec_gu, q_size, kv_size)


def _refresh(x, plan, plan_host, plan_count, pooling_codes, norm_codes, w_down, b_down, rat_num,
             rat_den, w_up, b_up, att_query, norm_weight, norm_bias, vec_qkv, vec_gu, q_size,
             kv_size) -> None:
    """refresh_vectors' kernel, every device (a plain function: the tests also run it on the
    meta device, where the op dispatches to its fake kernel)."""
    count = int(plan_count[0])
    if count == 0:  # decode-only step: nothing to compute
        return
    rows, rows_host = plan[:count], plan_host[:count]
    slots, adapters = rows[:, PLAN_SLOT], rows[:, PLAN_ADAPTER]
    starts, lengths = rows[:, PLAN_START], rows[:, PLAN_LENGTH]
    longest = int(rows_host[:, PLAN_LENGTH].max())
    steps = torch.arange(longest, device=x.device)
    mask = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [count, longest]
    # Padded positions repeat the prompt's last token (finite), and the mask drops them.
    index = starts.unsqueeze(1) + torch.minimum(steps.unsqueeze(0), lengths.unsqueeze(1) - 1)
    prompts = x[index]  # [count, longest, d]
    queries = att_query[adapters]
    adapters_host = rows_host[:, PLAN_ADAPTER]
    pooled = _per_code(pooling_codes[adapters_host], POOLING_MODES, x.device,
                       lambda mode: pool(prompts, mask, mode, queries))
    pooled = _per_code(norm_codes[adapters_host], POOL_NORMS, x.device,
                       lambda mode: normalise(pooled, mode))
    pooled = pooled * norm_weight[adapters] + norm_bias[adapters]
    vectors = generate(pooled.to(x.dtype), adapters, w_down, b_down, rat_num, rat_den, w_up, b_up,
                       check_ids=False)  # (the planner's ids, valid by construction)
    inter = vec_gu.shape[1] // 2
    vec_qkv[slots, :q_size] = vectors[:, :q_size]
    vec_qkv[slots, q_size + kv_size:] = vectors[:, q_size:q_size + kv_size]
    vec_gu[slots, inter:] = vectors[:, q_size + kv_size:]


_LIB.impl("refresh_vectors", _refresh, "CompositeExplicitAutograd")


@torch.library.register_fake("pedro_serving::refresh_vectors", lib=_LIB)
def _(x, plan, plan_host, plan_count, pooling_codes, norm_codes, w_down, b_down, rat_num, rat_den,
      w_up, b_up, att_query, norm_weight, norm_bias, vec_qkv, vec_gu, q_size, kv_size):
    return None


def _per_code(codes: Tensor, modes, device, fn) -> Tensor:
    """fn(mode) for each request with its adapter's mode (codes: on the host, index modes):
    [P, d] fp32."""
    present = sorted(set(codes.tolist()))
    if len(present) == 1:
        return fn(modes[present[0]])
    out: Optional[Tensor] = None
    for code in present:
        chosen = (codes == code).to(device, non_blocking=True).unsqueeze(1)
        value = fn(modes[code])
        out = torch.where(chosen, value, out if out is not None else torch.zeros_like(value))
    return out
