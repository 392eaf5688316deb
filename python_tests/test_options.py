"""Recipe options of the generator (pooling, normalisation of the pooled input, init scale),
prompt_vectors against an independent float64 computation, and the vector-spread diagnostic."""
import itertools
import math

import pytest
import torch

from pedro_ext import PedroConfig, get_pedro_model
from pedro_ext.config import POOL_NORMS, POOLING_MODES
from pedro_ext.diagnostics import vector_spread
from pedro_ext.layer import NORM_EPS
from pedro_ext.reference import rational_eval

from tiny_models import randomize_adapter, tiny_model

OPTIONS = list(itertools.product(POOLING_MODES, POOL_NORMS, (False, True)))


def _all_options_model():
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4), adapter_name="plain")
    names = []
    for i, (pooling, norm, affine) in enumerate(OPTIONS):
        name = f"o{i}"
        pedro.add_adapter(name, PedroConfig(r=2 + i % 3, pooling=pooling, pool_norm=norm,
                                            pool_norm_affine=affine, init_scale=0.5 + i % 2))
        names.append(name)
    return pedro.eval(), names


def _padded_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [4 + int(x) for x in torch.randint(0, 5, (n,), generator=g)]
    t = max(lengths)
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):  # left padding, as for generation
        ids[i, t - length:] = torch.randint(3, 97, (length,), generator=g)
        mask[i, t - length:] = 1
    prompt_lengths = [max(1, length - 2) for length in lengths]
    return ids, mask, prompt_lengths


def test_a_fresh_adapter_is_the_base_model_for_every_option():
    pedro, names = _all_options_model()
    ids, mask, prompt_lengths = _padded_batch(len(names))
    with torch.no_grad():
        with pedro.disable_adapter():
            base = pedro(ids, attention_mask=mask).logits
        got = pedro(ids, attention_mask=mask, adapter_names=names,
                    prompt_lengths=prompt_lengths).logits
    assert torch.equal(got, base)


def _expected_vectors(pedro, names, ids, mask, prompt_lengths):
    """Per layer [B, D] in float64 from the hidden states each q_proj received, with pooling,
    normalisation and the generator written out row by row."""
    inputs = {}
    hooks = [bank_linear.base_layer.register_forward_pre_hook(
        lambda m, a, idx=idx: inputs.__setitem__(idx, a[0].detach().double()))
        for idx, bank_linear in ((i, pedro.get_base_model().model.layers[i].self_attn.q_proj)
                                 for i in pedro.banks)]
    with torch.no_grad():
        pedro(ids, attention_mask=mask, adapter_names=names, prompt_lengths=prompt_lengths)
    for h in hooks:
        h.remove()
    out = {}
    for idx, x in inputs.items():
        rows = []
        for b, name in enumerate(names):
            cfg, w = pedro.peft_config[name], pedro.banks[idx].adapters[name]
            real = mask[b].bool().nonzero().flatten()
            h = x[b, real[:prompt_lengths[b]]]  # the prompt's positions
            if cfg.pooling == "mean":
                p = h.mean(0)
            elif cfg.pooling == "last":
                p = h[-1]
            elif cfg.pooling == "max":
                p = h.max(0).values
            else:
                p = torch.softmax(h @ w.att_query.double(), 0) @ h
            if cfg.pool_norm == "layer":
                p = (p - p.mean()) / math.sqrt(p.var(unbiased=False) + NORM_EPS)
            elif cfg.pool_norm == "rms":
                p = p / math.sqrt(p.pow(2).mean() + NORM_EPS)
            if w.norm_weight is not None:
                p = p * w.norm_weight.double()
            if w.norm_bias is not None:
                p = p + w.norm_bias.double()
            z = p @ w.w_down.double() + w.b_down.double()
            r = rational_eval(z, w.rat_num.double(), w.rat_den.double())
            rows.append(1 + r @ w.w_up.double() + w.b_up.double())
        out[idx] = torch.stack(rows)
    return out


def test_prompt_vectors_match_a_row_by_row_float64_computation():
    pedro, names = _all_options_model()
    for i, name in enumerate(names):
        randomize_adapter(pedro, name, seed=i, scale=0.3)
    pedro.eval()
    ids, mask, prompt_lengths = _padded_batch(len(names), seed=1)
    got = pedro.prompt_vectors(ids, attention_mask=mask, adapter_names=names,
                               prompt_lengths=prompt_lengths)
    want = _expected_vectors(pedro, names, ids, mask, prompt_lengths)
    assert sorted(got) == sorted(want) == sorted(pedro.banks)
    for idx in got:
        assert got[idx].shape == (len(names), pedro.banks[idx].big_d)
        torch.testing.assert_close(got[idx].double(), want[idx], rtol=2e-5, atol=2e-5)
    assert not torch.allclose(got[0][0], got[0][1])


def test_prompt_vectors_of_base_rows_are_ones():
    pedro, _ = _all_options_model()
    ids = torch.randint(3, 97, (2, 5))
    for v in pedro.prompt_vectors(ids, adapter_names=[None, "__base__"]).values():
        assert torch.equal(v, torch.ones_like(v))


@pytest.mark.parametrize("init_scale", [0.5, 3.0])
def test_init_scale_sets_the_std_of_w_down(init_scale):
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=64, init_scale=init_scale))
    d = pedro.banks[0].d
    w = torch.cat([b.adapters["default"].w_down.flatten() for b in pedro.banks.values()])
    assert w.std().item() == pytest.approx(init_scale / math.sqrt(d), rel=0.05)


def test_vector_spread_against_its_definition():
    pedro = get_pedro_model(tiny_model(), PedroConfig(r=4, pool_norm="rms"))
    ids, mask, prompt_lengths = _padded_batch(4, seed=2)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt_lengths": torch.tensor(prompt_lengths)}
    fresh = vector_spread(pedro, batch)
    assert fresh["layers"] == sorted(pedro.banks)
    assert fresh["mean_spread_rms"] == 0 and fresh["mean_static_rms"] == 0
    randomize_adapter(pedro, "default", seed=3)
    pedro.train()
    got = vector_spread(pedro, batch)
    assert pedro.training, "the model's mode is restored"
    vectors = pedro.prompt_vectors(ids, attention_mask=mask, prompt_lengths=prompt_lengths)
    for i, idx in enumerate(got["layers"]):
        v = vectors[idx].double()
        b_up = pedro.banks[idx].adapters["default"].b_up.detach().double()
        assert got["spread_rms"][i] == pytest.approx(float((v - v.mean(0)).pow(2).mean().sqrt()))
        assert got["static_rms"][i] == pytest.approx(float(b_up.pow(2).mean().sqrt()))
        assert got["spread_rms"][i] > 0
    with pytest.raises(ValueError, match="at least 2 prompts"):
        vector_spread(pedro, {"input_ids": ids[:1]})


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="pool_norm must be one of"):
        PedroConfig(pool_norm="batch")
    with pytest.raises(ValueError, match="init_scale must be a finite number"):
        PedroConfig(init_scale=-1.0)
