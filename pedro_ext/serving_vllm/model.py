"""PedroLlamaForCausalLM: vLLM's Llama with PEDRO vectors scaling Q, V and up per request.

Per step (the runner hook, on the host): the planner gives every token the vector-buffer row of
its request and lists the requests whose prompts this step computes; both are written in place
into persistent buffers (the list also into a host copy, from which refresh_vectors decides, so
no layer waits for the device). Per layer (inside the model, compiled or eager): refresh_vectors
fills the listed requests' rows from their pooled prompts, then pedro_ext.modulate scales the
fused qkv and gate_up outputs by each token's row. Nothing the graph reads is Python state, so
the compiled model follows every step's routing.

The forward code of LlamaAttention / LlamaMLP is repeated here with the two scaling calls added;
it matches the pinned vLLM version (see SUPPORTED_VLLM_VERSION)."""
import functools
from typing import Optional

import numpy as np
import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fusion.fused_act_quant import maybe_fused_act_quant
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from ..ops import modulate
from .bank import AdapterBank, ModelDims
from .config_check import ADAPTERS_KEY, adapter_name_of
from .step_plan import PLAN_COLUMNS, StepPlanner
from .vector_ops import refresh_vectors


class PedroStepState(nn.Module):
    """This step's routing, shared by every layer: token -> vector row, and the plan of
    requests whose vectors are computed now. Written in place before each forward."""

    def __init__(self, bank: AdapterBank, num_slots: int, max_tokens: int):
        super().__init__()
        self.bank = bank
        self.base_row = num_slots
        self.planner = StepPlanner(num_slots)
        self.register_buffer("token_rows", torch.full((max_tokens,), num_slots, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("plan", torch.zeros(num_slots, PLAN_COLUMNS, dtype=torch.int64),
                             persistent=False)
        # The plan's host copy, its row count and the adapters' modes stay on the CPU (plain
        # attributes, not buffers: a move of the model leaves them there): refresh_vectors
        # decides from them, so no layer waits for the device (the step's routing is copied
        # to the device once, in prepare).
        # (device="cpu" explicitly: vLLM builds the model under a default device)
        self.plan_host = torch.zeros(num_slots, PLAN_COLUMNS, dtype=torch.int64, device="cpu")
        self.plan_count = torch.zeros(1, dtype=torch.int64, device="cpu")
        self.pooling_codes = bank.pooling_codes.to("cpu", copy=True)
        self.norm_codes = bank.norm_codes.to("cpu", copy=True)
        self._planned_tokens: Optional[int] = None  # set by prepare, consumed by the forward
        self.steps = 0  # forwards routed by the runner hook
        self.unrouted_forwards = 0  # dummy / profiling forwards (every token on the base row)

    def prepare(self, runner) -> None:
        """Plan the step the runner is about to run (GPUModelRunner's V1 state, host side)."""
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        query_start = runner.query_start_loc.np[:n + 1]
        requests = runner.requests
        step = self.planner.plan(
            req_ids, batch.num_computed_tokens_cpu[:n], np.diff(query_start),
            batch.num_prompt_tokens[:n], requests,
            adapter_of=lambda req_id: self.bank.adapter_id(
                adapter_name_of(requests[req_id].sampling_params)))
        num_tokens = len(step.token_rows)
        self._check_capacity(num_tokens)
        self.token_rows[:num_tokens].copy_(torch.from_numpy(step.token_rows))
        count = len(step.plan)
        if count:
            self.plan_host[:count].copy_(torch.from_numpy(step.plan))
            self.plan[:count].copy_(self.plan_host[:count])
        self.plan_count.fill_(count)
        self._planned_tokens = num_tokens
        self.steps += 1

    def begin_forward(self, num_tokens: int) -> None:
        self._check_capacity(num_tokens)
        planned, self._planned_tokens = self._planned_tokens, None
        if planned is None:
            if is_forward_context_available() and get_forward_context().attn_metadata is not None:
                raise RuntimeError(
                    "PEDRO: a forward pass over real requests ran without the PEDRO runner hook "
                    "(GPUModelRunner._model_forward); this vLLM runner is not supported, and "
                    "serving would silently ignore every adapter")
            planned = 0
            self.plan_count.zero_()
            self.unrouted_forwards += 1
        if num_tokens > planned:  # padding tokens: base row
            self.token_rows[planned:num_tokens].fill_(self.base_row)

    def _check_capacity(self, num_tokens: int) -> None:
        if num_tokens > self.token_rows.numel():
            raise RuntimeError(f"PEDRO: {num_tokens} tokens in one step, the routing buffer "
                               f"holds {self.token_rows.numel()} (max_num_batched_tokens)")


class PedroLayerVectors(nn.Module):
    """One decoder layer's bank and vector rows. Rows 0..R-1 belong to requests (see
    StepPlanner), row R is the base model's (ones, never written)."""

    def __init__(self, bank: AdapterBank, layer: int, num_slots: int, dtype: torch.dtype,
                 step: PedroStepState):
        super().__init__()
        dims = bank.dims
        self.q_size, self.kv_size = dims.q_size, dims.kv_size
        self.step = step
        for key, tensor in bank.layer_tensors(layer, dtype).items():
            self.register_buffer(key, tensor, persistent=False)
        self.register_buffer("vec_qkv", torch.ones(num_slots + 1, dims.q_size + 2 * dims.kv_size,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("vec_gu", torch.ones(num_slots + 1, 2 * dims.intermediate_size,
                                                  dtype=dtype), persistent=False)

    def refresh(self, hidden_states: torch.Tensor) -> None:
        step = self.step
        refresh_vectors(hidden_states, step.plan, step.plan_host, step.plan_count,
                        step.pooling_codes, step.norm_codes, self.w_down, self.b_down,
                        self.rat_num, self.rat_den, self.w_up, self.b_up, self.att_query,
                        self.norm_weight, self.norm_bias, self.vec_qkv, self.vec_gu, self.q_size,
                        self.kv_size)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.token_rows[:x.shape[0]]

    # The rows come from the step planner, valid by construction: no id check (on a GPU it
    # would be a host sync per call).
    def scale_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        return modulate(qkv, self.vec_qkv, self._rows(qkv), check_ids=False)

    def scale_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        return modulate(gate_up, self.vec_gu, self._rows(gate_up), check_ids=False)


class PedroLlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer whose q/v and up outputs are scaled by the layer's PEDRO vectors. The
    generator reads the normalised hidden states that qkv_proj receives."""

    pedro: PedroLayerVectors  # attached by PedroLlamaForCausalLM after construction

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._attention(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self._mlp(hidden_states), residual

    def _attention(self, positions, hidden_states):
        attn = self.self_attn
        self.pedro.refresh(hidden_states)
        qkv, _ = attn.qkv_proj(hidden_states)
        qkv = self.pedro.scale_qkv(qkv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        out, _ = attn.o_proj(attn.attn(q, k, v))
        return out

    def _mlp(self, x):
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj(x)
        gate_up = self.pedro.scale_gate_up(gate_up)
        x = maybe_fused_act_quant(mlp.act_fn, gate_up, mlp.down_proj)
        x, _ = mlp.down_proj(x)
        return x


class PedroLlamaForCausalLM(LlamaForCausalLM):
    """A Llama-family checkpoint served with a bank of PEDRO adapters (hf_overrides
    {"architectures": ["PedroLlamaForCausalLM"], "pedro_adapters": ...}); each request picks
    its adapter with SamplingParams.extra_args={"pedro_adapter": name}."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        if get_tensor_model_parallel_world_size() != 1 or not get_pp_group().is_first_rank \
                or not get_pp_group().is_last_rank:
            raise ValueError("PEDRO's vLLM model runs without tensor or pipeline parallelism")
        hf_config = vllm_config.model_config.hf_config
        bank = AdapterBank(getattr(hf_config, ADAPTERS_KEY), ModelDims.from_hf_config(hf_config))
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=PedroLlamaDecoderLayer)
        scheduler = vllm_config.scheduler_config
        num_slots = scheduler.max_num_seqs
        self.pedro_bank = bank
        self.pedro_step = PedroStepState(bank, num_slots, scheduler.max_num_batched_tokens)
        dtype = vllm_config.model_config.dtype
        for idx, layer in enumerate(self.model.layers):
            layer.pedro = PedroLayerVectors(bank, idx, num_slots, dtype, self.pedro_step)
        bank.release_weights()  # the layers hold the stacked copies
        install_runner_hook()

    def pedro_prepare_step(self, runner) -> None:
        self.pedro_step.prepare(runner)

    def pedro_stats(self) -> dict:
        """Counters for tests and monitoring."""
        step = self.pedro_step
        return {"routed_steps": step.steps, "unrouted_forwards": step.unrouted_forwards,
                "vector_computations": step.planner.vector_computations,
                "held_rows": len(step.planner.slots), "adapters": list(self.pedro_bank.names)}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self.pedro_step.begin_forward(positions.shape[0])
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)


def install_runner_hook() -> None:
    """Make vLLM's V1 model runner plan each PEDRO step right before the forward pass
    (GPUModelRunner._model_forward, which vLLM documents as the method to override for model
    execution). Other models are untouched: the hook looks for pedro_prepare_step."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_pedro_hook", False):
        return

    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        prepare = getattr(self.model, "pedro_prepare_step", None)
        if prepare is not None:
            prepare(self)
        return original(self, *args, **kwargs)

    _model_forward._pedro_hook = True
    GPUModelRunner._model_forward = _model_forward
