import torch

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
