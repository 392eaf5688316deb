"""Randomised differential test of every op against the float64 reference (issue 8, "Fuzzing").

A seeded generator (the same cases on every run) draws 1000 small cases per op over dtypes,
shapes (empty batches included), int32/int64 ids with repeats and -1, unchecked invalid ids
(the NaN rule), column slices, strided and misaligned rows, and padded / packed layouts, and
compares outputs and gradients with pedro_ext.reference in float64. A second test breaks one
argument of a valid call at random and requires a clear Python exception that names the op and
the argument. The same tests run on CUDA when a GPU is present (bench/gpu_check.sh).
"""
import random

import pytest
import torch

import pedro_ext
from pedro_ext import reference as ref

from conftest import TOL
from helpers import make_bank

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = 1000
BROKEN_CASES = 300
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BANK_KEYS = ("w_down", "b_down", "rat_num", "rat_den", "w_up", "b_up")


class Case:
    """Random draws for one case: Python's random for the structure, a torch generator for data."""

    def __init__(self, op, index, device):
        self.rng = random.Random(f"{op}/{index}")
        self.gen = torch.Generator().manual_seed(self.rng.randrange(2 ** 31))
        self.device = device
        self.desc = {"op": op, "case": index}

    def pick(self, name, options):
        value = self.rng.choice(options)
        self.desc[name] = value
        return value

    def int(self, name, lo, hi):
        value = self.rng.randint(lo, hi)
        self.desc[name] = value
        return value

    def randn(self, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(
            dtype=dtype, device=self.device)

    def ids(self, length, n, dtype, none=True, invalid=False):
        """Ids in [0, n) with repeats, some -1 (none) and, with `invalid`, out-of-range ones."""
        values = [self.rng.randrange(n) if n else -1 for _ in range(length)]
        for i in range(length):
            roll = self.rng.random()
            if none and roll < 0.2:
                values[i] = -1
            elif invalid and roll < 0.35:
                values[i] = self.rng.choice([n, n + 7, -2, -1000])
        return torch.tensor(values, dtype=dtype).to(self.device)

    def rows(self, shape, dtype, scale=1.0):
        """A tensor of `shape` (last dim D) whose rows are, at random, contiguous, a column slice
        of a wider tensor (evenly strided rows) or one element off 16-byte alignment."""
        kind = self.pick("rows", ["contiguous", "strided", "misaligned"])
        numel = 1
        for s in shape:
            numel *= s
        if kind == "strided":
            extra = self.rng.randint(1, 9)
            off = self.rng.randint(0, extra)
            wide = self.randn(*shape[:-1], shape[-1] + extra, dtype=dtype, scale=scale)
            return wide[..., off:off + shape[-1]]
        if kind == "misaligned":
            return self.randn(numel + 1, dtype=dtype, scale=scale)[1:].view(shape)
        return self.randn(*shape, dtype=dtype, scale=scale)

    def vectors(self, b, big_d, dtype):
        """[B, D] vectors, often a column slice of a wider tensor (like l_q of [l_q l_v l_u]):
        the slice is taken last, so it keeps the wide tensor's row stride and offset."""
        off = self.rng.choice([0, 0, 1, 3, 8])
        wide = self.randn(b, big_d + off + self.rng.randint(0, 5), dtype=dtype, scale=0.5)
        wide.add_(1)
        v = wide[:, off:off + big_d]
        self.desc["vectors_contiguous"] = v.is_contiguous()
        return v


def close(actual, expected, dtype, what, desc):
    """actual against the float64 reference: NaN exactly where the reference has NaN, elsewhere
    within the dtype's tolerance relative to the reference's magnitude."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, (what, desc, a.shape, e.shape)
    assert actual.dtype == dtype, (what, desc, actual.dtype)
    nan_e, nan_a = torch.isnan(e), torch.isnan(a)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs in {desc}"
    if e.numel() == 0:
        return
    a, e = a[~nan_e], e[~nan_e]
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    tol = TOL[dtype]
    bad = (a - e).abs() > tol * scale + tol * e.abs()
    assert not bad.any(), f"{what}: max error {(a - e).abs().max().item():.3g} " \
                          f"(scale {scale:.3g}) in {desc}"


def differential(fn, ref_fn, inputs, grads_out, dtype, desc, backward=True):
    """Runs fn on inputs and ref_fn on float64 CPU copies; compares outputs and the gradients of
    every floating input (leaves are the tensors as given: slices keep their strides)."""
    def run(f, args, gs, as_ref):
        leaves = []
        for t in args:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().double().cpu() if as_ref else t.detach()
                t = t.requires_grad_(backward)
            elif isinstance(t, torch.Tensor) and as_ref:
                t = t.cpu()
            leaves.append(t)
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if backward:  # the reference of an all "no adapter" batch is a constant
            pairs = [(o, g.double().cpu() if as_ref else g) for o, g in zip(outs, gs)
                     if o.requires_grad]
            if pairs:
                torch.autograd.backward(*zip(*pairs))
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return outs, grads

    outs, grads = run(fn, inputs, grads_out, False)
    r_outs, r_grads = run(ref_fn, inputs, grads_out, True)
    for i, (a, e) in enumerate(zip(outs, r_outs)):
        assert a.device.type == inputs[0].device.type
        close(a, e, dtype, f"output {i}", desc)
    for i, (a, e) in enumerate(zip(grads, r_grads)):
        close(a, e if e is not None else torch.zeros_like(a), dtype, f"grad {i}", desc)


# ----------------------------------------------------------------------- case builders
def bank_case(c, dtype):
    n, d, r, big_d = c.int("N", 0, 4), c.int("d", 1, 9), c.int("r", 0, 5), c.int("D", 1, 12)
    bank = make_bank(n, d, r, big_d + 6, dtype=dtype, device=c.device,
                     num_len=c.int("num_len", 1, 6), den_len=c.int("den_len", 0, 4),
                     seed=c.rng.randrange(1000))
    off = c.rng.randint(0, 6)  # a column slice, as the wrapper passes w_up[:, :, q or v or u]
    bank["w_up"], bank["b_up"] = bank["w_up"][:, :, off:off + big_d], bank["b_up"][:, off:off + big_d]
    return n, d, big_d, [bank[k] for k in BANK_KEYS]


def layout_case(c, b, big_d, dtype, scale=1.0):
    """(shape of x, seq_ids or None, check_ids) for a padded or packed call."""
    invalid = c.rng.random() < 0.15
    if c.pick("layout", ["padded", "packed"]) == "padded":
        return (b, c.int("T", 0, 4), big_d), None, True
    s = c.int("S", 0, 10)
    seq = c.ids(s, b, c.pick("seq_dtype", [torch.int32, torch.int64]), none=False, invalid=invalid)
    if b == 0 and s > 0:
        invalid = True  # every row of a packed call without requests is invalid
    return (s, big_d), seq, not invalid


def run_generate(c):
    dtype = c.pick("dtype", DTYPES)
    n, d, big_d, bank = bank_case(c, dtype)
    b = c.int("B", 0, 6)
    invalid = c.rng.random() < 0.15
    ids = c.ids(b, n, c.pick("id_dtype", [torch.int32, torch.int64]), invalid=invalid)
    pooled = c.randn(b, d, dtype=dtype)
    differential(lambda p, *a: pedro_ext.generate(p, ids, *a, check_ids=not invalid),
                 lambda p, *a: ref.generate(p, ids.cpu(), *a),
                 [pooled, *bank], [c.randn(b, big_d, dtype=dtype)], dtype, c.desc)


def run_modulate(c, inplace=False):
    dtype = c.pick("dtype", DTYPES)
    b, big_d = c.int("B", 0, 5), c.int("D", 0, 20)
    shape, seq, check = layout_case(c, b, big_d, dtype)
    x = c.rows(shape, dtype)
    v = c.vectors(b, big_d, dtype)
    if inplace:
        expected = ref.modulate(x.double().cpu(), v.double().cpu(), None if seq is None else seq.cpu())
        out = pedro_ext.modulate_(x, v, seq, check_ids=check)
        assert out is x
        close(x, expected, dtype, "modulate_", c.desc)
        return
    differential(lambda xx, vv: pedro_ext.modulate(xx, vv, seq, check_ids=check),
                 lambda xx, vv: ref.modulate(xx, vv, None if seq is None else seq.cpu()),
                 [x, v], [c.randn(*shape, dtype=dtype)], dtype, c.desc)


def run_generate_and_modulate(c):
    dtype = c.pick("dtype", DTYPES)
    n, d, big_d, bank = bank_case(c, dtype)
    b = c.int("B", 0, 5)
    bad_adapter = c.rng.random() < 0.1
    ids = c.ids(b, n, torch.int64, invalid=bad_adapter)
    shape, seq, check = layout_case(c, b, big_d, dtype)
    x = c.rows(shape, dtype)
    pooled = c.randn(b, d, dtype=dtype)
    seq_cpu = None if seq is None else seq.cpu()
    differential(
        lambda xx, p, *a: pedro_ext.generate_and_modulate(xx, p, ids, *a, seq_ids=seq,
                                                          check_ids=check and not bad_adapter),
        lambda xx, p, *a: ref.generate_and_modulate(xx, seq_cpu, p, ids.cpu(), *a),
        [x, pooled, *bank], [c.randn(*shape, dtype=dtype), c.randn(b, big_d, dtype=dtype)],
        dtype, c.desc)


def run_act_mul_modulate(c):
    dtype = c.pick("dtype", DTYPES)
    activation = c.pick("activation", ["silu", "gelu_tanh"])
    b, big_d = c.int("B", 0, 5), c.int("D", 0, 20)
    shape, seq, check = layout_case(c, b, big_d, dtype)
    gate, up = c.rows(shape, dtype, scale=3.0), c.rows(shape, dtype)
    v = c.vectors(b, big_d, dtype)
    seq_cpu = None if seq is None else seq.cpu()
    differential(lambda g, u, w: pedro_ext.act_mul_modulate(g, u, w, seq, activation, check_ids=check),
                 lambda g, u, w: ref.act_mul_modulate(g, u, w, seq_cpu, activation),
                 [gate, up, v], [c.randn(*shape, dtype=dtype)], dtype, c.desc)


def run_rational(c):
    dtype = c.pick("dtype", [torch.float32, torch.float64])  # half coefficient sums: test_ops
    shape = c.pick("shape", [(0,), (1,), (5,), (3, 7), (2, 3, 4), (33,)])
    x = c.randn(*shape, dtype=dtype, scale=2.0)
    num = c.randn(c.int("num_len", 1, 7), dtype=dtype, scale=0.5)
    den = c.randn(c.int("den_len", 0, 5), dtype=dtype, scale=0.5)
    differential(pedro_ext.rational, ref.rational, [x, num, den], [c.randn(*shape, dtype=dtype)],
                 dtype, c.desc)


RUNNERS = {
    "generate": run_generate,
    "modulate": run_modulate,
    "modulate_": lambda c: run_modulate(c, inplace=True),
    "generate_and_modulate": run_generate_and_modulate,
    "act_mul_modulate": run_act_mul_modulate,
    "rational": run_rational,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(RUNNERS))
def test_fuzz_against_reference(op, device):
    cases = [Case(op, i, device) for i in range(CASES)]
    for c in cases:
        RUNNERS[op](c)
    _assert_layouts_were_drawn(op, cases)


def _assert_layouts_were_drawn(op, cases):
    """The generator really produced the layouts it promises (a slice made contiguous by a later
    operation once hid the sliced vectors from every case)."""
    def share(key, value):
        drawn = [c.desc[key] for c in cases if key in c.desc]
        return sum(d == value for d in drawn) / max(1, len(drawn))

    if op in ("modulate", "modulate_", "act_mul_modulate"):
        assert share("vectors_contiguous", False) > 0.3, op
        for kind in ("strided", "misaligned"):
            assert share("rows", kind) > 0.2, (op, kind)


# ----------------------------------------------------------------------- broken inputs
def _other_device(device):
    return "meta" if device == "cpu" else "cpu"


def _valid_call(c, op):
    """(argument names, argument values, call) of a small valid call of `op`."""
    dev = c.device
    b, big_d = c.rng.randint(1, 4), c.rng.randint(1, 6)
    ids = torch.tensor([c.rng.randrange(-1, 3) for _ in range(b)], device=dev)
    if op in ("generate", "generate_and_modulate"):
        bank = make_bank(3, 4, 2, big_d, device=dev)
        names = ["pooled", "adapter_ids", *BANK_KEYS]
        values = [c.randn(b, 4), ids, *[bank[k] for k in BANK_KEYS]]
        if op == "generate":
            return names, values, lambda *a: pedro_ext.generate(*a)
        return (["x"] + names, [c.randn(b, 2, big_d)] + values,
                lambda x, *a: pedro_ext.generate_and_modulate(x, *a))
    seq = torch.tensor([c.rng.randrange(b) for _ in range(5)], device=dev)
    if op in ("modulate", "modulate_"):
        fn = pedro_ext.modulate if op == "modulate" else pedro_ext.modulate_
        return ["x", "vectors", "seq_ids"], [c.randn(5, big_d), c.randn(b, big_d), seq], fn
    if op == "act_mul_modulate":
        return (["gate", "up", "vectors", "seq_ids", "activation"],
                [c.randn(5, big_d), c.randn(5, big_d), c.randn(b, big_d), seq, "silu"],
                pedro_ext.act_mul_modulate)
    return ["x", "rat_num", "rat_den"], [c.randn(7), c.randn(3), c.randn(2)], pedro_ext.rational


def _breakages(name, t, device):
    """Ways to make argument `name` (value t) invalid on its own, each a function of t."""
    if isinstance(t, str):
        return [lambda s: "relu", lambda s: "SiLU"]
    out = [lambda z: z.to(_other_device(device))]
    if name != "x" or t.dim() > 1:  # rational takes x of any shape
        out.append(lambda z: z.unsqueeze(0))
    if t.is_floating_point():
        out += [lambda z: z.to(torch.int32),
                lambda z: z.to(torch.float64 if z.dtype != torch.float64 else torch.float32)]
    else:
        out += [lambda z: z.float(), lambda z: z[:-1] if z.numel() else z.new_zeros(1),
                lambda z: torch.full_like(z, 1000), lambda z: torch.full_like(z, -5)]
    if t.dim() >= 2:  # one size made wrong: N for the coefficients, the last dim otherwise
        dim = 0 if name in ("rat_num", "rat_den") else t.dim() - 1
        out.append(lambda z, dim=dim: torch.cat([z, z.narrow(dim, 0, 1)], dim))
    return out


OPS = list(RUNNERS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_fuzz_broken_inputs_raise_clear_errors(op, device):
    for i in range(BROKEN_CASES):
        c = Case(f"broken-{op}", i, device)
        names, values, fn = _valid_call(c, op)
        k = c.rng.randrange(len(names))
        breaks = _breakages(names[k], values[k], device)
        broken = list(values)
        broken[k] = c.rng.choice(breaks)(values[k])
        try:
            fn(*broken)
        except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as exc:
            message = str(exc)
            assert f"pedro_ext.{op}" in message or "pedro_ext::" in message, (names[k], message)
            assert names[k] in message, (names[k], message)
        else:
            pytest.fail(f"{op}: breaking {names[k]} raised nothing (case {i})")
