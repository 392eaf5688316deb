"""A tiny random Llama on disk (head size 32: vLLM's CPU attention needs >= 32), a bank of PEDRO
adapters written by PedroModel.save_pretrained, and the Hugging Face reference: PedroModel.generate
(greedy) on the same weights."""
import functools
import os
from typing import Dict, List, Optional, Tuple

import torch
import transformers

from pedro_ext import PedroConfig, PedroModel, get_pedro_model

VOCAB_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2}

# name -> PedroConfig: every pooling mode and pool_norm, mixed r and rational degrees, one adapter
# that leaves layer 0 alone (the bank pads and zero-fills; vLLM must match each alone in HF).
ADAPTERS = {
    "mean8": dict(r=8, pooling="mean", pool_norm="rms"),
    "last4": dict(r=4, pooling="last", rational_init="identity", pool_norm="none"),
    "att6": dict(r=6, pooling="attention", rational_degrees=(6, 5), pool_norm="layer",
                 pool_norm_affine=True),
    "max3": dict(r=3, pooling="max", layers_to_transform=[1, 2]),
}


def make_tiny_llama(path: str) -> str:
    """A byte-level tokenizer (every byte a token) and a random 3-layer Llama, saved to path."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = dict(VOCAB_SPECIALS)
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init: sharper, tie-free logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    return path


def _randomize(pedro: PedroModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pedro.base_model.named_parameters():
            if "pedro_bank" not in name:
                continue
            if name.endswith(("w_up", "b_up")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif name.endswith("att_query"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("norm_weight", "norm_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(("rat_num", "rat_den")):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def make_bank(model_path: str, path: str) -> Dict[str, str]:
    """Each adapter of ADAPTERS saved in its own sub-folder of path; {name: folder}."""
    paths = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        torch.manual_seed(100 + i)
        pedro = get_pedro_model(base, PedroConfig(**kwargs))
        _randomize(pedro, seed=200 + i)
        paths[name] = os.path.join(path, name)
        pedro.save_pretrained(paths[name])
    return paths


@functools.lru_cache(maxsize=None)
def _hf_model(model_path: str, adapter_path: Optional[str]):
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.generation_config.eos_token_id = None  # always max_new_tokens, like ignore_eos
    model = base if adapter_path is None else PedroModel.from_pretrained(base, adapter_path)
    return model.eval()


def hf_greedy(model_path: str, adapter_path: Optional[str], prompt: List[int], n: int
              ) -> Tuple[List[int], List[float]]:
    """PedroModel.generate (or the bare model's, for adapter_path None), greedy: the n new tokens
    and each one's log-probability."""
    model = _hf_model(model_path, adapter_path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def prompts(count: int, seed: int = 0, lo: int = 3, hi: int = 40) -> List[List[int]]:
    """Token-id prompts of different lengths (ids of printable bytes)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (count,), generator=g).tolist()
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]
