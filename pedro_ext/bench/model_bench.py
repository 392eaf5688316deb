"""Model level: multi-tenant decoding with a random-weight LLaMA-architecture model.

B requests, each with an adapter drawn from a bank of N (all distinct when B <= N), prompt of
P tokens, G new tokens with HF generate (greedy, length forced). prefill_ms = median time of
generate(max_new_tokens=1); decode tokens/s = B * (G - 1) / (median total - prefill)."""
import contextlib
import statistics
from typing import List

import torch
import transformers

from ..config import PedroConfig
from ..layer import reference_ops
from ..model import get_pedro_model
from .lora import inject_batched_lora
from .presets import Preset
from .timing import median_ms

LORA_TARGETS = ["q_proj", "v_proj"]


def build_model(preset: Preset, device, dtype):
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, pad_token_id=0,
                                   tie_word_embeddings=False, **preset.model)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    return model.eval()


def lora_rank_for(params_per_adapter: int, cfg) -> int:
    """LoRA rank on q_proj and v_proj whose parameter count is closest to PEDRO's."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_rank = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.hidden_size
                                        + cfg.num_key_value_heads * head_dim)
    return max(1, round(params_per_adapter / per_rank))


class ModelBench:
    def __init__(self, preset: Preset, device: torch.device):
        self.p, self.device = preset, device
        self.dtype = getattr(torch, preset.dtype)
        self.model = build_model(preset, device, self.dtype)
        self.pedro_config = PedroConfig(r=preset.pedro_r)
        probe = get_pedro_model(self.model, self.pedro_config)
        self.pedro_params = probe.adapter_num_parameters()
        probe.unload()
        self.lora_rank = lora_rank_for(self.pedro_params, self.model.config)
        head_dim = self.model.config.hidden_size // self.model.config.num_attention_heads
        c = self.model.config
        self.lora_params = self.lora_rank * c.num_hidden_layers * (
            2 * c.hidden_size + c.hidden_size + c.num_key_value_heads * head_dim)

    def count(self) -> int:
        return len(self.p.model_batches) * 5

    def _prompts(self, batch):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, self.model.config.vocab_size, (batch, self.p.model_prompt_len),
                            generator=g).to(self.device)
        return ids, torch.ones_like(ids)

    def _time_once(self, gen, ids, mask):
        """(total ms, prefill ms) of one generate call each, after a warm-up call."""
        def run(new):
            return lambda i: gen(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        total = median_ms(run(self.p.model_new_tokens), self.device, 1, 1)
        prefill = median_ms(run(1), self.device, 0, 1)
        return total, prefill

    @contextlib.contextmanager
    def _method(self, method, batch):
        n = self.p.model_bank
        names = [f"a{i % n}" for i in range(batch)]
        if method == "base":
            yield self.model.generate
        elif method in ("pedro", "pedro_reference"):
            pedro = get_pedro_model(self.model, PedroConfig(r=self.p.pedro_r), adapter_name="a0")
            for i in range(1, n):
                pedro.add_adapter(f"a{i}", PedroConfig(r=self.p.pedro_r))
            with torch.no_grad():  # non-trivial adapters (fresh ones are the identity)
                for bank in pedro.banks.values():
                    for w in bank.adapters.values():
                        w.w_up.normal_(std=0.01)
            pedro.eval()
            ctx = reference_ops() if method == "pedro_reference" else contextlib.nullcontext()
            try:
                with ctx:
                    yield lambda **kw: pedro.generate(adapter_names=names, **kw)
            finally:
                pedro.unload()
        elif method == "lora_peft":
            import peft
            cfg = lambda: peft.LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank,  # noqa: E731
                                          target_modules=LORA_TARGETS, init_lora_weights=False)
            model = peft.get_peft_model(self.model, cfg(), adapter_name="a0")
            for i in range(1, n):
                model.add_adapter(f"a{i}", cfg())
            model.eval()
            try:
                yield lambda **kw: model.generate(adapter_names=names, **kw)
            finally:
                model.unload()
        elif method == "lora_bmm":
            holder, undo = inject_batched_lora(self.model, LORA_TARGETS, n, self.lora_rank, 2.0)
            holder["ids"] = torch.tensor([i % n for i in range(batch)], device=self.device)
            try:
                yield self.model.generate
            finally:
                undo()
        else:
            raise ValueError(method)

    def rows(self, progress=None) -> List[dict]:
        """Methods are measured in interleaved rounds (base, pedro, ..., base, pedro, ...) and
        each reports its median over rounds, so machine drift hits every method alike."""
        out = []
        methods = ("base", "pedro", "pedro_reference", "lora_bmm", "lora_peft")
        for batch in self.p.model_batches:
            ids, mask = self._prompts(batch)
            samples = {m: ([], []) for m in methods}
            for _ in range(self.p.model_repeats):
                for method in methods:
                    with torch.no_grad(), self._method(method, batch) as gen:
                        total, prefill = self._time_once(gen, ids, mask)
                    samples[method][0].append(total)
                    samples[method][1].append(prefill)
            base_tps = None
            for method in methods:
                total = statistics.median(samples[method][0])
                prefill = statistics.median(samples[method][1])
                decode_ms = max(total - prefill, 1e-6)
                tps = batch * (self.p.model_new_tokens - 1) / (decode_ms * 1e-3)
                params = {"base": 0, "pedro": self.pedro_params, "pedro_reference": self.pedro_params}
                row = dict(level="model", phase="decode", method=method, batch_size=batch,
                           distinct_adapters=min(batch, self.p.model_bank),
                           rank=self.lora_rank if method.startswith("lora") else (
                               self.p.pedro_r if method.startswith("pedro") else 0),
                           median_ms=decode_ms / (self.p.model_new_tokens - 1),
                           tokens_per_s=tps, prefill_ms=prefill, rounds=self.p.model_repeats,
                           params_per_adapter=params.get(method, self.lora_params))
                if method == "base":
                    base_tps = tps
                row["tokens_per_s_vs_base"] = tps / base_tps
                out.append(row)
                out.append(dict(row, phase="prefill", median_ms=prefill,
                                tokens_per_s=batch * self.p.model_prompt_len / (prefill * 1e-3)))
                if progress is not None:
                    progress.update(1)
        return out
