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
