"""Model level: multi-tenant decoding with Hugging Face generate, every request with its own adapter.

Per method and batch size B (prompts of P tokens, G tokens generated per request):
- TTFT, time to first token: from the generate call to the first token (the prefill; PEDRO
  computes its vectors there);
- TPOT, time per output token: every decoding step, timed one by one.

Both are timestamps taken inside generate by a StoppingCriteria that HF calls once per token
(timing.StepClock), not differences of whole calls. Why inside generate rather than an explicit
decode loop over the KV cache: every method is measured through the API it serves with
(PedroModel.generate(adapter_names=...), peft's generate(adapter_names=...), plain generate);
PEDRO's semantics (vectors from the prompt at prefill, reused at every step) belong to a
generate call of its public API, so a hand-written loop would need its private routing; and
the same loop runs compiled with HF's static cache (--compile, --cuda-graph) with no
bench-side code. Each interval also holds HF's per-step bookkeeping (logits processing,
token selection), the same for every method.

Rounds: one untimed warm-up round, then `model_rounds` timed rounds; in each round every
method runs once, in a balanced order (timing.round_order), so machine drift hits them alike.
The warm-up generates as many tokens as a timed round: the first call to grow the KV cache to
each length pays for what a GPU sets up once per shape (the caching allocator's reservations,
attention kernels' plans), and after a short warm-up that fell on the first timed round's
first method (on the first GPU run, every batch size's bare model had one round several times
slower than its others).
Reported: median and IQR over all steps of all timed rounds (TPOT) and over rounds (TTFT), and
the ratio to base per round. Figures faster than reading the weights once are refused (sanity.py).

All methods share one copy of the base weights: each is a structural copy of the model whose
parameters are the same tensors, wrapped once for the whole run (PEDRO, peft LoRA, batched
LoRA), so no method pays for set-up inside a round and compiled graphs survive between rounds.
"""
import contextlib
import copy
import time
from typing import Callable, Dict, List, Optional

import torch
import transformers
from torch import nn
from transformers import StoppingCriteriaList

from ..config import PedroConfig
from ..layer import PedroLinear, reference_ops
from ..model import get_pedro_model
from .lora import inject_batched_lora
from .lora_bgmv import unavailable_reason
from .op_profile import decode_op_profile
from .presets import Preset
from .sanity import WeightFloor, refusal
from .timing import Stats, StepClock, round_order

LORA_TARGETS = ["q_proj", "v_proj"]
METHODS = ("base", "pedro", "pedro_reference", "lora_bmm", "lora_bgmv", "lora_peft")
MODES = ("eager", "compiled", "cuda_graph", "compiled+cuda_graph")
PROMPT_TEXT = (
    "The committee met on Tuesday to review the quarterly figures. Revenue grew in every region "
    "except the north, where a late harvest delayed shipments by several weeks. The chair asked "
    "for a plan to recover the lost volume before the end of the year, and the finance team "
    "proposed moving part of the marketing budget to logistics. Several members objected that "
    "cutting advertising during the holiday season would hurt sales more than the delay did. "
    "After a long discussion they agreed to hire two additional carriers for the winter, to "
    "report weekly on delivery times, and to revisit the budget in January once the numbers "
    "for December were known. The meeting closed with a short update on the new warehouse, "
    "which is expected to open in the spring and to halve the time goods spend in transit.")


def random_llama(fields: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A Llama with random weights made directly on `device`: built on the meta device, then
    storage allocated there and filled in place (no slow initialisation on the CPU)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(max_position_embeddings=4096, pad_token_id=0,
                                   tie_word_embeddings=False, **fields)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary frequencies uninitialised: build that module on the device
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LlamaRotaryEmbedding):
                setattr(parent, attr, LlamaRotaryEmbedding(cfg).to(device))
    stale = [n for n, _ in model.named_buffers() if "rotary_emb" not in n]
    if stale:
        raise RuntimeError(f"random_llama: buffers {stale} would hold uninitialised memory")
    return model.eval()


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer or None) for the preset's model level."""
    if preset.model_source == "smollm2":
        from ..offline import load_smollm2
        model, tokenizer = load_smollm2(dtype)
        return model.to(device).eval(), tokenizer
    if preset.model_source != "random":
        raise ValueError(f"preset {preset.name}: model_source must be 'random' or 'smollm2', got "
                         f"{preset.model_source!r}")
    return random_llama(preset.model, device, dtype), None


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters are the same tensors as model's."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of the weights one decoding step must read: every Linear (the LM head included;
    a tied embedding counts once), not the embedding table, of which a step reads B rows."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total


def lora_rank_for(params_per_adapter: int, cfg) -> int:
    """LoRA rank on q_proj and v_proj whose parameter count is closest to PEDRO's."""
    return max(1, round(params_per_adapter / _lora_params_per_rank(cfg)))


def _lora_params_per_rank(cfg) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.hidden_size
                                    + cfg.num_key_value_heads * head_dim)


# A method wrapped once: generate(batch, **generate_kwargs) serves the first `batch` adapters.
Method = Callable[..., torch.Tensor]


class ModelBench:
    def __init__(self, preset: Preset, device: torch.device, mode: str = "eager",
                 methods=METHODS, profile_ops: bool = False):
        """profile_ops: after each batch size's timed rounds, one more call per method under
        torch.profiler (op_profile.py); its per-operator figures go into the decode row."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if "cuda_graph" in mode and device.type != "cuda":
            raise ValueError(f"mode {mode!r} needs a CUDA device")
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown model-level methods {sorted(unknown)}; choose from {METHODS}")
        self.p, self.device, self.mode, self.profile_ops = preset, device, mode, profile_ops
        self.dtype = getattr(torch, preset.dtype)
        t0 = time.perf_counter()
        self.model, self.tokenizer = build_model(preset, device, self.dtype)
        self.model_build_s = time.perf_counter() - t0
        self.config = self.model.config
        self.weight_bytes = weight_bytes_per_step(self.model)
        probe = get_pedro_model(shared_copy(self.model), PedroConfig(r=preset.pedro_r))
        self.pedro_params = probe.adapter_num_parameters()
        # one vector entry per output feature of every wrapped projection, per request
        self.pedro_vector_entries = sum(m.out_features for m in probe.modules()
                                        if isinstance(m, PedroLinear))
        del probe
        self.lora_rank = lora_rank_for(self.pedro_params, self.config)
        self.lora_params = self.lora_rank * _lora_params_per_rank(self.config)
        self.floor = WeightFloor(self.weight_bytes, self.dtype, device)
        self.messages: List[str] = []
        self.methods = list(methods)
        if "lora_bgmv" in self.methods and unavailable_reason(device):
            self.methods.remove("lora_bgmv")
            self.messages.append(f"model level: lora_bgmv skipped: {unavailable_reason(device)}")
        self.clock = StepClock(device)
        self.gen_kwargs = self._mode_kwargs()
        if mode != "eager":
            # Every method's copy of the model, at every batch size, is its own set of graphs
            # for the same code objects: dynamo's default limit of 8 per code object would
            # silently send the later ones back to eager.
            from torch._dynamo import config as cfg
            cfg.recompile_limit = max(cfg.recompile_limit, 64)
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)

    # ------------------------------------------------------------------ set-up
    def _mode_kwargs(self) -> dict:
        if self.mode == "eager":
            return {}
        from transformers import CompileConfig
        if self.mode == "cuda_graph":  # CUDA graphs of the eager kernels, no code generation
            cfg = CompileConfig(fullgraph=False, dynamic=False, backend="cudagraphs", mode=None)
        else:
            graphs = self.mode == "compiled+cuda_graph"
            cfg = CompileConfig(fullgraph=False, dynamic=False,
                                mode="reduce-overhead" if graphs else "default")
        cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
        return dict(cache_implementation="static", compile_config=cfg)

    def _names(self, n):
        return [f"a{i}" for i in range(n)]

    def _setup(self, method: str) -> Method:
        n = self.p.model_bank
        model = shared_copy(self.model)
        if method == "base":
            return lambda batch, **kw: model.generate(**kw)
        if method in ("pedro", "pedro_reference"):
            names = self._names(n)
            pedro = get_pedro_model(model, PedroConfig(r=self.p.pedro_r), adapter_name=names[0])
            for name in names[1:]:
                pedro.add_adapter(name, PedroConfig(r=self.p.pedro_r))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # non-trivial adapters: fresh ones are the identity
                for name in names:
                    for p in pedro.adapter_parameters(name):
                        if not p.any():
                            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            pedro.eval()  # also refreshes the stacked banks after the in-place change
            ctx = reference_ops if method == "pedro_reference" else contextlib.nullcontext

            def gen(batch, **kw):
                with ctx():
                    return pedro.generate(adapter_names=names[:batch], **kw)
            gen.pedro = pedro  # for studies that check what ran (bench.prefill_adapters)
            return gen
        if method == "lora_peft":
            import peft
            names = self._names(n)

            def cfg():
                return peft.LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank,
                                       target_modules=LORA_TARGETS, init_lora_weights=False)
            # adapters in the model's dtype, like every other method (peft's default would
            # keep them in fp32 under a half-precision model and cast x at every call)
            peft_model = peft.get_peft_model(model, cfg(), adapter_name=names[0],
                                             autocast_adapter_dtype=False)
            for name in names[1:]:
                peft_model.add_adapter(name, cfg(), autocast_adapter_dtype=False)
            peft_model.eval()
            return lambda batch, **kw: peft_model.generate(adapter_names=names[:batch], **kw)
        if method in ("lora_bmm", "lora_bgmv"):
            holder, _ = inject_batched_lora(model, LORA_TARGETS, n, self.lora_rank, 2.0,
                                            kind=method.split("_")[1])
            ids = torch.arange(n, device=self.device)

            def gen(batch, **kw):
                holder["ids"] = ids[:batch]
                return model.generate(**kw)
            return gen
        raise ValueError(method)

    def _prompts(self, batch: int):
        plen = self.p.model_prompt_len
        if self.tokenizer is not None:
            text = self.tokenizer(PROMPT_TEXT, return_tensors="pt").input_ids[0]
            if text.numel() < plen + batch:
                text = text.repeat((plen + batch) // text.numel() + 1)
            ids = torch.stack([text[i:i + plen] for i in range(batch)])  # one window per request
        else:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, self.config.vocab_size, (batch, plen), generator=g)
        ids = ids.to(self.device)
        return ids, torch.ones_like(ids)

    # ------------------------------------------------------------------ timing
    def _generate(self, generate: Method, batch: int, ids, mask, new: int) -> List[float]:
        """[ttft, step 1, ..., step new-1] in ms of one generate call."""
        self.clock.start()
        out = generate(batch, input_ids=ids, attention_mask=mask, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([self.clock]), **self.gen_kwargs)
        intervals = self.clock.intervals_ms()
        if out.shape[1] != ids.shape[1] + new or len(intervals) != new:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens in "
                               f"{len(intervals)} timed steps, {new} were asked for")
        return intervals

    def count(self) -> int:
        return len(self.p.model_batches) * len(self.methods) * (1 + self.p.model_rounds)

    def rows(self, progress=None, deadline: Optional[float] = None) -> List[dict]:
        """deadline (time.time()): no new batch size starts after it."""
        setups: Dict[str, Method] = {}
        errors: Dict[str, str] = {}
        for method in self.methods:
            try:
                setups[method] = self._setup(method)
            except Exception as e:  # reported, and the other methods still run
                errors[method] = f"set-up failed: {type(e).__name__}: {e}"
        measured = []
        self.floor.measure()
        for done, batch in enumerate(self.p.model_batches):
            if deadline is not None and time.time() > deadline:
                self.messages.append(f"model level: stopped at the time limit after batch sizes "
                                     f"{list(self.p.model_batches[:done])}")
                break
            batch_errors = dict(errors)
            measured.append((batch, *self._batch_runs(batch, setups, batch_errors, progress),
                             batch_errors))
        self.floor.measure()
        for method, reason in errors.items():
            self.messages.append(f"model level: {method}: {reason}")
        out = []
        for batch, runs, graphs, profiles, batch_errors in measured:
            out += self._summarise(batch, runs, batch_errors, graphs, profiles)
        return out

    def _batch_runs(self, batch, setups, errors, progress):
        """(runs, graphs, profiles) of one batch size: per method the [ttft, steps...] of every
        timed round, what torch.compile did, and the operator profiles (profile_ops); failures
        go into errors."""
        ids, mask = self._prompts(batch)
        new = self.p.model_new_tokens
        methods = [m for m in self.methods if m in setups]
        runs = {m: [] for m in methods}  # per timed round: [ttft, steps...]
        graphs = {}
        for rnd in range(1 + self.p.model_rounds):
            # (timed round i runs the design's row i - 1: a full design when rounds = n or 2n)
            for method in round_order(methods, max(rnd - 1, 0)):
                if method in errors:
                    continue
                before, skips_before = _dynamo_graphs(), _cudagraph_skips()
                try:
                    with torch.no_grad():
                        intervals = self._generate(setups[method], batch, ids, mask, new)
                except Exception as e:  # reported in its row; the other methods go on
                    errors[method] = f"{type(e).__name__}: {str(e)[:300]}"
                    self.messages.append(f"model level B={batch} {method}: {errors[method]}")
                    continue
                finally:
                    if progress is not None:
                        progress.update(1)
                if rnd == 0:
                    graphs[method] = _dynamo_graphs() - before
                    if _cudagraph_skips() != skips_before:
                        graphs.setdefault("graph_skipped", set()).add(method)
                else:
                    runs[method].append(intervals)
                    if _dynamo_graphs() != before:
                        graphs.setdefault("recompiled", set()).add(method)
        profiles = self._profiles(batch, setups, methods, errors, ids, mask, new) \
            if self.profile_ops else {}
        return runs, graphs, profiles

    def _profiles(self, batch, setups, methods, errors, ids, mask, new) -> Dict[str, dict]:
        out = {}
        for method in methods:
            if method in errors:
                continue
            try:
                with torch.no_grad():
                    out[method] = decode_op_profile(
                        lambda **kw: setups[method](batch, **kw), new, self.device,
                        input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                        **self.gen_kwargs)
            except Exception as e:  # the timed figures stand; the profile is missing, said so
                self.messages.append(f"model level B={batch} {method}: op profile failed: "
                                     f"{type(e).__name__}: {str(e)[:300]}")
        return out

    def _summarise(self, batch, runs, errors, graphs, profiles) -> List[dict]:
        floor = self.floor.ms
        plen = self.p.model_prompt_len
        out = []
        base = runs.get("base") if "base" not in errors else None
        base_refused = set()
        for method in self.methods:
            row = dict(level="model", phase="decode", method=method, mode=self.mode,
                       batch_size=batch, distinct_adapters=min(batch, self.p.model_bank),
                       rank=self.lora_rank if method.startswith("lora") else (
                           self.p.pedro_r if method.startswith("pedro") else 0),
                       params_per_adapter=0 if method == "base" else (
                           self.pedro_params if method.startswith("pedro") else self.lora_params),
                       prompt_len=plen, new_tokens=self.p.model_new_tokens,
                       rounds=len(runs.get(method, [])))
            if self.mode != "eager":
                row["graphs_compiled"] = graphs.get(method)
                row["warnings"] = []
                if method in graphs.get("recompiled", ()):
                    row["recompiled_while_timed"] = True
                    row["warnings"].append("torch.compile recompiled during the timed rounds: "
                                           "the figure holds compilation time")
                if "cuda_graph" in self.mode and method in graphs.get("graph_skipped", ()):
                    row["warnings"].append("CUDA graphs were skipped for part of the decode step "
                                           "(torch's cudagraph_skips counter rose in warm-up)")
                if graphs.get(method) == 0 and batch == self.p.model_batches[0]:
                    row["warnings"].append("no graph was compiled in the warm-up round: the "
                                           "decode step may have run eagerly")
            if method in errors or not runs.get(method):
                reason = errors.get(method, "not measured")
                out += [dict(row, median_ms=None, error=reason),
                        dict(row, phase="prefill", median_ms=None, error=reason)]
                continue
            steps = [t for run in runs[method] for t in run[1:]]
            ttfts = [run[0] for run in runs[method]]
            tpot, ttft = Stats.of(steps), Stats.of(ttfts)
            # per round (the order the rounds ran): a round at another speed shows here
            round_tpot = [Stats.of(run[1:]).median for run in runs[method]]
            decode = dict(row, **_fields(tpot), tpot_ms=tpot.to_dict(), ttft_ms=ttft.to_dict(),
                          prefill_ms=ttft.median, steps=tpot.n,
                          tokens_per_s=batch * 1e3 / tpot.median, round_medians_ms=round_tpot)
            if method.startswith("pedro"):  # read once per step, one row per request
                decode["vector_bytes_per_step"] = (batch * self.pedro_vector_entries
                                                   * self.dtype.itemsize)
            if method in profiles:
                decode["decode_ops"] = profiles[method]
            prefill = dict(row, phase="prefill", **_fields(ttft), ttft_ms=ttft.to_dict(),
                           prefill_ms=ttft.median, tokens_per_s=batch * plen * 1e3 / ttft.median,
                           round_medians_ms=ttfts)
            for r, samples, what in ((decode, steps, "the fastest decoding step"),
                                     (prefill, ttfts, "the fastest prefill")):
                reason = refusal(min(samples), floor, what)
                if reason:
                    r.update(refused=reason, median_ms=None, tokens_per_s=None)
                    self.messages.append(f"model level B={batch} {method} {r['phase']}: "
                                         f"REFUSED {reason}")
                    if method == "base":
                        base_refused.add(r["phase"])
            if base:
                if "decode" not in base_refused:
                    _vs_base(decode, runs[method], base, lambda run: Stats.of(run[1:]).median)
                if "prefill" not in base_refused:
                    _vs_base(prefill, runs[method], base, lambda run: run[0])
            out += [decode, prefill]
        return out


def _fields(st: Stats) -> dict:
    return dict(median_ms=st.median, iqr_ms=st.iqr, q1_ms=st.q1, q3_ms=st.q3)


def _vs_base(row, runs, base_runs, per_round):
    """tokens_per_s_vs_base (pooled medians) and its spread over the interleaved rounds."""
    if row.get("median_ms") is None:
        return
    pairs = list(zip(runs, base_runs))
    ratios = [per_round(b) / per_round(m) for m, b in pairs]
    base_median = Stats.of([t for b in base_runs for t in (b[1:] if row["phase"] == "decode"
                                                          else b[:1])]).median
    row["tokens_per_s_vs_base"] = base_median / row["median_ms"]
    row["vs_base_rounds"] = Stats.of(ratios).to_dict() if ratios else None


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])
