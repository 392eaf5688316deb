"""Host-side bookkeeping of a PEDRO vLLM model, one call per engine step: which vector-buffer row
each request owns (keyed by request id, never by batch row: vLLM reorders its batch between
steps) and the step's plan: per token the row whose vectors scale it, and for every request whose
prompt is computed in this step, where its prompt tokens lie so that its vectors are computed
from them. Needs no vLLM: the runner hook feeds it plain arrays."""
from dataclasses import dataclass
from typing import Callable, Container, Dict, List, Optional, Sequence

import numpy as np

# Columns of a plan row.
PLAN_SLOT, PLAN_ADAPTER, PLAN_START, PLAN_LENGTH = range(4)
PLAN_COLUMNS = 4


class PromptSplitError(RuntimeError):
    """A prompt arrived in pieces (chunked prefill or prefix caching): PEDRO needs all of it."""


@dataclass
class StepPlan:
    token_rows: np.ndarray  # [num_tokens] int64: vector-buffer row per token (base_row: none)
    plan: np.ndarray  # [num_computing, 4] int64: (slot, adapter, first token, prompt length)


class SlotTable:
    """Vector-buffer rows 0..num_slots-1 of the adapter requests in flight. A row is held from
    the step that computes the request's vectors until the request is gone from the runner."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._by_request: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_request)

    def get(self, req_id: str) -> Optional[int]:
        return self._by_request.get(req_id)

    def release_gone(self, alive: Container[str]) -> None:
        for req_id in [r for r in self._by_request if r not in alive]:
            self._free.append(self._by_request.pop(req_id))

    def acquire(self, req_id: str, in_batch: Container[str]) -> int:
        if req_id in self._by_request:  # recomputed after preemption: same row
            return self._by_request[req_id]
        if not self._free:
            # Every row is held: take one from a request outside this step (a preempted one
            # recomputes its prompt, and so its vectors, when it resumes).
            victim = next((r for r in self._by_request if r not in in_batch), None)
            if victim is None:
                raise RuntimeError(f"PEDRO: more than {self.num_slots} adapter requests in one "
                                   "step; the vector buffers are sized by max_num_seqs")
            self._free.append(self._by_request.pop(victim))
        slot = self._free.pop()
        self._by_request[req_id] = slot
        return slot


class StepPlanner:
    """Builds each step's StepPlan."""

    def __init__(self, num_slots: int):
        self.slots = SlotTable(num_slots)
        self.base_row = num_slots
        self._adapters: Dict[str, int] = {}  # request id -> bank index (-1: base)
        self.vector_computations = 0  # requests whose vectors were computed (for tests)

    def plan(self, req_ids: Sequence[str], num_computed: np.ndarray, num_scheduled: np.ndarray,
             prompt_lengths: np.ndarray, alive: Container[str],
             adapter_of: Callable[[str], int]) -> StepPlan:
        """req_ids in batch-row order; num_computed: tokens each request had computed before
        this step; num_scheduled: its tokens in this step (they follow each other in the
        packed batch in row order); prompt_lengths: its prompt's length; alive: the ids of
        every request the runner still holds; adapter_of(req_id): the request's bank index
        (-1: base), asked once per request."""
        self.slots.release_gone(alive)
        for req_id in [r for r in self._adapters if r not in alive]:
            del self._adapters[req_id]
        rows = np.empty(len(req_ids), dtype=np.int64)
        starts = np.zeros(len(req_ids), dtype=np.int64)
        np.cumsum(num_scheduled[:-1], out=starts[1:])
        plan: List[tuple] = []
        in_batch = set(req_ids)
        for i, req_id in enumerate(req_ids):
            adapter = self._adapters.get(req_id)
            if adapter is None:
                adapter = self._adapters[req_id] = adapter_of(req_id)
            computed, scheduled, prompt = (int(num_computed[i]), int(num_scheduled[i]),
                                           int(prompt_lengths[i]))
            if adapter >= 0 and computed < prompt and (computed > 0 or scheduled < prompt):
                raise PromptSplitError(
                    f"PEDRO: request {req_id!r} has a prompt of {prompt} tokens but this step "
                    f"computes tokens {computed}..{computed + scheduled - 1}; PEDRO computes its "
                    "vectors from the whole prompt at once (disable chunked prefill and prefix "
                    "caching, and keep max_num_batched_tokens >= max_model_len)")
            if adapter < 0:
                rows[i] = self.base_row
            elif computed == 0:
                rows[i] = self.slots.acquire(req_id, in_batch)
                plan.append((rows[i], adapter, starts[i], prompt))
                self.vector_computations += 1
            else:
                slot = self.slots.get(req_id)
                if slot is None:
                    raise RuntimeError(f"PEDRO: request {req_id!r} is decoding but its vectors "
                                       "are gone (its row was given to another request)")
                rows[i] = slot
        token_rows = np.repeat(rows, num_scheduled)
        return StepPlan(token_rows, np.asarray(plan, dtype=np.int64).reshape(-1, PLAN_COLUMNS))
