"""Tiny randomly initialised causal LMs of the supported architectures."""
import torch
import transformers


def tiny_config(arch="llama", **overrides):
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": getattr(transformers, "Qwen3Config", None)}[arch]
    if arch == "qwen3":
        common["head_dim"] = 12
    return cls(**common)


def tiny_model(arch="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2"] + (["qwen3"] if hasattr(transformers, "Qwen3Config") else [])


def randomize_adapter(pedro, name, seed, scale=0.5):
    """Give an adapter non-trivial weights (a fresh one is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pedro.adapter_parameters(name):
            if p.dim() >= 1 and p.shape[0] > 0:
                p.add_(torch.randn(p.shape, generator=g) * scale * (0.05 if p.dim() == 1 and p.numel() < 8 else 1.0))


class CharTokenizer:
    """A stand-in tokenizer for the tiny models: one id per character (ids 3..96)."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Enc([3 + (ord(c) % 94) for c in text])


def toy_pairs(n, seed=0):
    """A learnable toy task: the response names the prompt's first letter's group."""
    import random
    rng = random.Random(seed)
    words = ["apple", "berry", "cherry", "dates", "elder"]
    pairs = []
    for _ in range(n):
        w = rng.choice(words)
        pairs.append((f"{w} {rng.randint(10, 99)} is", f" {w[0] * 3}"))
    return pairs
