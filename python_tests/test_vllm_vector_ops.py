"""pedro_serving::refresh_vectors (the vLLM plugin's prefill op), which needs no vLLM: its vectors
against the library's own pooling and the float64 reference generator, and every decision it
makes from the host tensors (a read of a device value would be a host sync per layer and step
on a GPU)."""
import pytest
import torch

from pedro_ext import reference
from pedro_ext.config import POOL_NORMS, POOLING_MODES
from pedro_ext.layer import normalise, pool
from pedro_ext.serving_vllm.vector_ops import _refresh, refresh_vectors

from helpers import make_bank

Q, KV, INTER, D_MODEL = 8, 4, 12, 16


def _case(device="cpu"):
    g = torch.Generator().manual_seed(0)
    n = 4
    bank = make_bank(n, D_MODEL, 5, Q + KV + INTER, seed=3)
    extra = dict(att_query=torch.randn(n, D_MODEL, generator=g),
                 norm_weight=1 + 0.1 * torch.randn(n, D_MODEL, generator=g),
                 norm_bias=0.1 * torch.randn(n, D_MODEL, generator=g))
    pooling = torch.tensor([POOLING_MODES.index(m) for m in ("mean", "last", "attention", "max")])
    norms = torch.tensor([POOL_NORMS.index(m) for m in ("none", "rms", "layer", "rms")])
    lengths, adapters, slots = [5, 3, 7, 2], [2, 0, 3, 1], [4, 1, 0, 2]
    starts = [0, 6, 9, 17]  # token 5 and 16 belong to decoding requests
    x = torch.randn(20, D_MODEL, generator=g)
    plan = torch.zeros(6, 4, dtype=torch.int64)
    plan[:4] = torch.tensor([slots, adapters, starts, lengths]).T
    count = torch.tensor([4])
    rows = 6
    vec_qkv, vec_gu = torch.ones(rows, Q + 2 * KV), torch.ones(rows, 2 * INTER)
    dev = {k: v.to(device) for k, v in dict(bank, **extra).items()}
    args = (x.to(device), plan.to(device), plan, count, pooling, norms,
            dev["w_down"], dev["b_down"], dev["rat_num"], dev["rat_den"], dev["w_up"],
            dev["b_up"], dev["att_query"], dev["norm_weight"], dev["norm_bias"],
            vec_qkv.to(device), vec_gu.to(device), Q, KV)
    return args, dict(bank=bank, extra=extra, x=x, pooling=pooling, norms=norms,
                      rows=list(zip(slots, adapters, starts, lengths)))


def test_refresh_fills_each_prompts_rows_and_nothing_else():
    args, case = _case()
    vec_qkv, vec_gu = args[15], args[16]
    refresh_vectors(*args)
    expected_qkv, expected_gu = torch.ones_like(vec_qkv), torch.ones_like(vec_gu)
    bank, extra = case["bank"], case["extra"]
    for slot, a, start, n in case["rows"]:
        prompt = case["x"][start:start + n].unsqueeze(0)
        p = pool(prompt, None, POOLING_MODES[case["pooling"][a]], extra["att_query"][a:a + 1])
        p = normalise(p, POOL_NORMS[case["norms"][a]]) * extra["norm_weight"][a] \
            + extra["norm_bias"][a]
        v = reference.generate(p.double(), torch.tensor([a]),
                               *(bank[k].double() for k in ("w_down", "b_down", "rat_num",
                                                            "rat_den", "w_up", "b_up")))[0]
        expected_qkv[slot, :Q] = v[:Q]
        expected_qkv[slot, Q + KV:] = v[Q:Q + KV]
        expected_gu[slot, INTER:] = v[Q + KV:]
    torch.testing.assert_close(vec_qkv, expected_qkv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vec_gu, expected_gu, rtol=1e-4, atol=1e-5)


def test_a_decode_only_step_changes_nothing():
    args, _ = _case()
    args[3].zero_()
    refresh_vectors(*args)
    assert torch.all(args[15] == 1) and torch.all(args[16] == 1)


def test_refresh_reads_no_value_of_a_device_tensor():
    """The device tensors on the meta device, which has no values: any read of one (the host
    sync it would be on a GPU) raises; the host tensors stay on the CPU."""
    args, _ = _case(device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        int(args[1][0, 0])  # the check can fail: reading a device value raises here
    _refresh(*args)  # (the op's body: the op itself would dispatch to its fake kernel on meta)
    assert args[15].device.type == "meta"


def test_opcheck():
    """Schema (its declared mutations), fake kernel and torch.compile's view of the op agree
    with the real kernel."""
    args, _ = _case()
    torch.library.opcheck(torch.ops.pedro_serving.refresh_vectors.default, args)
