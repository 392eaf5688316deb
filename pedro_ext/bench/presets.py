"""Benchmark presets. Kernel sizes are one LLaMA layer's adapted modules: hidden d -> Q, V and
FFN-up outputs. The CPU presets scale LLaMA-2-7B down so a 2-core machine finishes in minutes."""
import dataclasses
from dataclasses import dataclass, field
from typing import Tuple


@dataclass(frozen=True)
class Preset:
    name: str
    dtype: str
    # kernel level
    d: int
    outs: Tuple[int, int, int]  # Q, V, FFN-up output widths
    bank: int  # adapters in the bank (N)
    batches: Tuple[int, ...]
    ranks: Tuple[int, ...]
    prompt_len: int  # prefill tokens per request at kernel level
    pedro_r: int
    repeats: int
    warmup: int
    # model level
    model: dict = field(default_factory=dict)
    model_batches: Tuple[int, ...] = (1, 8, 32)
    model_bank: int = 16
    model_prompt_len: int = 32
    model_new_tokens: int = 16
    model_repeats: int = 3

    def replace(self, **kw) -> "Preset":
        return dataclasses.replace(self, **kw)


LLAMA7B_LAYER = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)

PRESETS = {
    "cpu": Preset(
        name="cpu", dtype="float32", d=1024, outs=(1024, 1024, 2752), bank=128,
        batches=(1, 8, 32, 128), ranks=(8, 16, 64), prompt_len=16, pedro_r=12, repeats=11,
        warmup=3,
        model=dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=4096, num_hidden_layers=4),
        model_batches=(1, 8, 32), model_bank=32, model_prompt_len=32, model_new_tokens=16,
        model_repeats=7),
    "gpu": Preset(
        name="gpu", dtype="bfloat16", d=4096, outs=(4096, 4096, 11008), bank=256,
        batches=(1, 8, 32, 128, 256), ranks=(8, 16, 64), prompt_len=128, pedro_r=12,
        repeats=50, warmup=10,
        model=dict(LLAMA7B_LAYER, num_hidden_layers=4),
        model_batches=(1, 8, 32, 128), model_bank=64, model_prompt_len=128,
        model_new_tokens=64, model_repeats=3),
    "tiny": Preset(  # for the test suite: seconds
        name="tiny", dtype="float32", d=64, outs=(64, 32, 96), bank=64, batches=(1, 8),
        ranks=(8,), prompt_len=8, pedro_r=4, repeats=3, warmup=1,
        model=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, num_hidden_layers=2),
        model_batches=(1, 8), model_bank=8, model_prompt_len=8, model_new_tokens=4,
        model_repeats=1),
}


def quick(preset: Preset) -> Preset:
    """--quick: fewer sizes and repeats, same shapes."""
    return preset.replace(batches=tuple(b for b in preset.batches if b <= 32)[:3],
                          ranks=preset.ranks[:2], repeats=max(3, preset.repeats // 3),
                          warmup=min(2, preset.warmup),
                          model_batches=tuple(b for b in preset.model_batches if b <= 8),
                          model_new_tokens=min(8, preset.model_new_tokens),
                          model_repeats=1)
