import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref
from pedro_ext.activations import GELU_DEN, GELU_NUM


def make_bank(n, d, r, big_d, dtype=torch.float32, device="cpu", num_len=6, den_len=4, seed=0):
    """A random adapter bank in the ops' layout, at magnitudes a trained generator would have."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    num = torch.zeros(n, num_len, dtype=torch.float64)
    den = torch.zeros(n, den_len, dtype=torch.float64)
    k_num, k_den = min(num_len, len(GELU_NUM)), min(den_len, len(GELU_DEN))
    num[:, :k_num] = torch.tensor(GELU_NUM[:k_num], dtype=torch.float64)
    den[:, :k_den] = torch.tensor(GELU_DEN[:k_den], dtype=torch.float64)
    num += rnd(n, num_len, scale=0.02)
    den += rnd(n, den_len, scale=0.02)
    bank = dict(
        w_down=rnd(n, d, r, scale=1.0 / d ** 0.5),
        b_down=rnd(n, r, scale=0.1),
        rat_num=num,
        rat_den=den,
        w_up=rnd(n, r, big_d, scale=0.2),
        b_up=rnd(n, big_d, scale=0.1),
    )
    return {k: v.to(dtype=dtype, device=device) for k, v in bank.items()}


def bank_args(bank):
    return [bank[k] for k in ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")]


def random_ids(batch, n, seed=0, none_fraction=0.25, dtype=torch.int64, device="cpu"):
    """Adapter ids with repeats and some -1 (no adapter)."""
    g = torch.Generator().manual_seed(seed)
    if n == 0:
        return torch.full((batch,), -1, dtype=dtype, device=device)
    ids = torch.randint(0, n, (batch,), generator=g)
    none = torch.rand(batch, generator=g) < none_fraction
    ids[none] = -1
    return ids.to(dtype=dtype, device=device)


def act_mul_layouts(dtype, device, d=1031, seed=0):
    """(layout, gate, up, seq_ids, B) in the layouts act_mul_modulate takes from a model: padded,
    the two halves of one fused gate_up projection, and packed rows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    b, t, s = 3, 5, 13
    yield "padded", rnd(b, t, d, scale=4.0), rnd(b, t, d), None, b
    gate_up = rnd(b, t, 2 * d, scale=4.0)
    yield "fused_gate_up", gate_up[..., :d], gate_up[..., d:], None, b
    seq = torch.randint(0, b, (s,), generator=g).to(device)
    yield "packed", rnd(s, d, scale=4.0), rnd(s, d), seq, b


def assert_bitwise(actual, expected, what=""):
    """Same dtype, shape and bits (NaN payloads and the sign of zero included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.contiguous().view(bits), expected.contiguous().view(bits)
    assert torch.equal(a, e), f"{what}: {(a != e).sum().item()} of {a.numel()} elements differ"


def check_modulate_inplace_memory_rules(device):
    """modulate_ on x whose elements share memory raises (leaving x as it was); vectors that
    share memory with x, even a view of it, give modulate's result on the values before the
    call (at::assert_no_overlap gives up on non-dense tensors, so both once passed silently)."""
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64).float().to(device)

    refused = "pedro_ext.modulate_: x has elements that may share memory"
    base = rnd(40)
    before = base.clone()
    with pytest.raises(RuntimeError, match=refused):  # rows 4 elements apart, 8 wide
        pedro_ext.modulate_(base.as_strided((4, 8), (4, 1)), rnd(4, 8),
                            torch.arange(4, device=device))
    with pytest.raises(RuntimeError, match=refused):  # padded rows overlapping along T
        pedro_ext.modulate_(base.as_strided((2, 3, 8), (20, 4, 1)), rnd(2, 8))
    with pytest.raises(RuntimeError, match=refused):
        pedro_ext.modulate_(rnd(2, 1, 4).expand(2, 3, 4), rnd(2, 4))
    assert torch.equal(base, before)

    x = rnd(2, 3, 8)
    cases = [
        ("vectors = x[:, 0]", x, lambda z: z[:, 0], None),
        ("vectors = x's first rows", rnd(6, 8), lambda z: z[:2], torch.tensor([0, 1, 1, 0, 1, 0])),
        ("x = vectors viewed as [B, 1, D]", rnd(2, 1, 4), lambda z: z[:, 0], None),
        ("vectors beside x in one fused tensor", rnd(2, 3, 16)[..., :8],
         lambda z: z.as_strided((2, 8), (48, 1), z.storage_offset() + 8), None),
    ]
    for what, x, view, seq in cases:
        seq = None if seq is None else seq.to(device)
        v = view(x)
        expected = pedro_ext.modulate(x.clone(), v.clone(), seq)
        exp_ref = ref.modulate(x.double().cpu(), v.double().cpu(), None if seq is None else seq.cpu())
        out = pedro_ext.modulate_(x, v, seq)
        assert out is x
        assert torch.equal(x, expected), what
        torch.testing.assert_close(x.double().cpu(), exp_ref, rtol=2e-6, atol=1e-6, msg=what)
    # layouts torch's own ops make are accepted: transposed, column-sliced, packed rows
    for x in (rnd(4, 6, 10).transpose(0, 1)[:, :, 2:7], rnd(6, 4, 10)[..., 3:8], rnd(5, 12)[1:, 2:7]):
        v = rnd(x.shape[0] if x.dim() == 3 else 2, 5)
        seq = None if x.dim() == 3 else torch.tensor([0, 1, 1, 0], device=device)
        expected = pedro_ext.modulate(x, v, seq)
        assert torch.equal(pedro_ext.modulate_(x, v, seq), expected)
