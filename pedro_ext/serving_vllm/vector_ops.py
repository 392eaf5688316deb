"""pedro_serving::refresh_vectors, the prefill half of PEDRO inside a vLLM forward pass, as a
custom op: torch.compile keeps it opaque, so it runs with each step's plan (tensor arguments)
instead of the plan seen when the graph was traced."""
from typing import Optional

import torch
from torch import Tensor

from ..layer import pool
from ..config import POOLING_MODES
from ..ops import generate
from .step_plan import PLAN_ADAPTER, PLAN_LENGTH, PLAN_SLOT, PLAN_START


@torch.library.custom_op("pedro_serving::refresh_vectors", mutates_args=("vec_qkv", "vec_gu"))
def refresh_vectors(x: Tensor, plan: Tensor, plan_count: Tensor, pooling_codes: Tensor,
                    w_down: Tensor, b_down: Tensor, rat_num: Tensor, rat_den: Tensor,
                    w_up: Tensor, b_up: Tensor, att_query: Tensor, vec_qkv: Tensor,
                    vec_gu: Tensor, q_size: int, kv_size: int) -> None:
    """Compute the vectors of the requests whose prompts this step processes, into their rows.

    Semantics:
        x [S, d]: the step's packed generator inputs (q_proj's input, every token of the batch)
        plan [R, 4] int64, plan_count [1]: rows (slot, adapter, start, length) for i < count
        pooling_codes [N]: each adapter's pooling mode (index into config.POOLING_MODES)
        bank: w_down [N, d, r] ... att_query [N, d] (pedro_ext.generate's layout)
        vec_qkv [R+1, q + 2 kv], vec_gu [R+1, 2 I]: vector rows, updated in place
        for (slot, a, start, n) in plan[:count]:
            p = pool(x[start:start + n], mode=POOLING_MODES[pooling_codes[a]], query=att_query[a])
            l = generate(p, a, bank)                       # [q + kv + I] = [l_q | l_v | l_u]
            vec_qkv[slot, :q] = l_q; vec_qkv[slot, q + kv:] = l_v; vec_gu[slot, I:] = l_u
    The K and gate columns keep their ones, so scaling the fused qkv / gate_up outputs by these
    rows scales exactly Q, V and up.
    """
    count = int(plan_count[0])
    if count == 0:  # decode-only step: nothing to compute
        return
    rows = plan[:count]
    slots, adapters = rows[:, PLAN_SLOT], rows[:, PLAN_ADAPTER]
    starts, lengths = rows[:, PLAN_START], rows[:, PLAN_LENGTH]
    longest = int(lengths.max())
    steps = torch.arange(longest, device=x.device)
    mask = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [count, longest]
    # Padded positions repeat the prompt's last token (finite), and the mask drops them.
    index = starts.unsqueeze(1) + torch.minimum(steps.unsqueeze(0), lengths.unsqueeze(1) - 1)
    prompts = x[index]  # [count, longest, d]
    pooled = _pool_per_mode(prompts, mask, pooling_codes[adapters], att_query[adapters])
    vectors = generate(pooled.to(x.dtype), adapters, w_down, b_down, rat_num, rat_den, w_up, b_up)
    inter = vec_gu.shape[1] // 2
    vec_qkv[slots, :q_size] = vectors[:, :q_size]
    vec_qkv[slots, q_size + kv_size:] = vectors[:, q_size:q_size + kv_size]
    vec_gu[slots, inter:] = vectors[:, q_size + kv_size:]


@refresh_vectors.register_fake
def _(x, plan, plan_count, pooling_codes, w_down, b_down, rat_num, rat_den, w_up, b_up,
      att_query, vec_qkv, vec_gu, q_size, kv_size):
    return None


def _pool_per_mode(prompts: Tensor, mask: Tensor, codes: Tensor, queries: Tensor) -> Tensor:
    """pedro_ext.layer.pool for each request with its adapter's mode: [P, T, d] -> [P, d] fp32."""
    present = sorted(set(codes.tolist()))
    if len(present) == 1:
        return pool(prompts, mask, POOLING_MODES[present[0]], queries)
    out: Optional[Tensor] = None
    for code in present:
        pooled = pool(prompts, mask, POOLING_MODES[code], queries)
        chosen = (codes == code).unsqueeze(1)
        out = torch.where(chosen, pooled, out if out is not None else torch.zeros_like(pooled))
    return out
