"""Per-step plumbing between vLLM's model runner and the steered forward pass.

Before each forward, the runner tells us the step's requests in batch order:
the V1 runner through its hook (patches/runner_hook.py, `prepare_step`), Model
Runner V2 through FLAS's model-state class (model_state.py), which keeps one
row per request. Either way a request's steering is read once when it joins,
its concept is encoded into the slot table, and `publish` writes the step's
per-token data (steered mask, dt, concept slot, steps) IN PLACE into
persistent buffers, which is what a trace-once compiled graph (and, on GPUs,
a captured CUDA graph) reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from flas_vllm.core.concept import tokenize_concept
from flas_vllm.engine.concept_cache import ConceptSlots
from flas_vllm.core.concept_encoder import encode_with_decoder
from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.flow import FlowFunction, dense_causal_attention, euler_dt
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_buffers import StepBuffers
from flas_vllm.core.steering import Steering

logger = logging.getLogger(__name__)


class FlasRuntime:
    """Request -> steering -> concept slot bookkeeping for one model instance (one worker)."""

    def __init__(self, model, options: FlasEngineOptions, flow: FlowFunction, n_steps: tuple[int, int],
                 concept_max_len: int, table: SlotTableKV, buffers: StepBuffers, tokenizer_name: str,
                 tokenizer_kwargs: Mapping[str, Any], own_encoder: nn.Module | None = None):
        self.model = model  # the vLLM text decoder whose layers 0-1 encode concepts
        self.options = options
        self.flow = flow
        self.n_steps, self.max_n_steps = n_steps  # a request's default, and the most it may ask for
        self.concept_max_len = concept_max_len
        self.table = table
        self.buffers = buffers
        self.slots = ConceptSlots(options.max_concepts, options.max_pinned)
        self._tokenizer_name = tokenizer_name
        self._tokenizer_kwargs = dict(tokenizer_kwargs)
        self._tokenizer = None
        self.own_encoder = own_encoder  # a checkpoint's own concept encoder (`concept_enc`), if any
        self._stale = False  # concepts in the table were encoded with weights since replaced
        self._req: dict[str, tuple[Steering | None, int]] = {}  # req_id -> (steering, slot)
        self._dt_cache: dict[tuple[float, int], torch.Tensor] = {}
        self.steered_requests = 0
        # Host-side facts about the current step, so the model never syncs on device data:
        self.any_steered = False  # is any token of this step steered?
        self.step_count = 0  # the most Euler steps any steered token of this step needs
        self.group_by_length = False  # set by the model where the flow may branch on data (no CUDA graphs)
        self.model_runner = "v1"  # which vLLM runner publishes the steps: "v2" once its model state exists

    # -- concepts ---------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name, **self._tokenizer_kwargs)
        return self._tokenizer

    def _ensure_encoded(self, concept: str, pin: bool = False) -> int:
        self._refresh_concepts()
        slot, fresh = self.slots.pin(concept) if pin else self.slots.acquire(concept)
        if fresh:
            self._encode_into(slot, concept)
        return slot

    def _encode_into(self, slot: int, concept: str) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            ids = tokenize_concept(self.tokenizer, concept, self.concept_max_len)
            if self.own_encoder is not None:
                c = encode_with_decoder(self.own_encoder, ids)
            else:
                c = encode_concept(self.model, ids)
            self.table.write(slot, self.flow.project_concept(c.to(self.flow.dtype)))
        self.slots.stats.encode_seconds += time.perf_counter() - start
        self.slots.stats.encoded += 1

    def weights_loaded(self) -> None:
        """The model's weights were (re)loaded: every concept in the table was encoded with the old ones.

        They are encoded again, in their own slots (requests keep their references), before the next
        step runs or the next concept is encoded. The prefix cache still holds KV computed with the
        old weights: whoever reloads resets it (`LLM.reset_prefix_cache()`).
        """
        self._stale = True

    def _refresh_concepts(self) -> None:
        if not self._stale:
            return
        self._stale = False
        for entry in self.slots.entries():
            self._encode_into(entry["slot"], entry["concept"])

    def preload(self, concepts: Sequence[str]) -> list[int]:
        """Encode and pin concepts; all or nothing when the pin budget (max_pinned) would overflow."""
        new = {c for c in concepts if not any(e["concept"] == c and e["pinned"] for e in self.slots.entries())}
        if self.slots.pinned_count + len(new) > self.slots.max_pinned:
            raise ValueError(
                f"concepts: pinning {len(new)} more would exceed max_pinned={self.slots.max_pinned} "
                f"({self.slots.pinned_count} pinned now); evict some first"
            )
        return [self._ensure_encoded(c, pin=True) for c in concepts]

    def evict(self, concepts: Sequence[str]) -> list[bool]:
        return [self.slots.evict(c) for c in concepts]

    def stats(self) -> dict:
        out = self.slots.snapshot()
        out["steered_requests"] = self.steered_requests
        out["concepts"] = self.slots.entries()
        out["flow_path"] = "skip" if self.group_by_length else "graph"  # eager skip path, or CUDA-graph-safe
        out["model_runner"] = self.model_runner
        return out

    # -- per step -----------------------------------------------------------------

    def finish(self, rid: str) -> None:
        """Drop a finished or aborted request and release its concept slot reference."""
        entry = self._req.pop(rid, None)
        if entry is not None and entry[0] is not None:
            self.slots.release(entry[1])

    def prepare_step(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray,
                     requests: Mapping[str, Any]) -> None:
        """V1 runner (patches/runner_hook.py): the step's requests in batch order, then its tokens."""
        for gone in [r for r in self._req if r not in requests]:
            self.finish(gone)  # normally already done by the runner's request-removed hook
        n_reqs = len(req_ids)
        steered = np.zeros(n_reqs, dtype=bool)
        slots = np.zeros(n_reqs, dtype=np.int64)
        steps = np.zeros(n_reqs, dtype=np.int32)
        dts = []
        for i, rid in enumerate(req_ids):
            entry = self._req.get(rid)
            if entry is None:
                params = getattr(requests[rid], "sampling_params", None)
                entry = self.admit(rid, getattr(params, "extra_args", None))
            steer, slot = entry
            if steer is not None and self.slots.slot_of(steer.concept) != slot:
                # evicted while preempted: encode again before it runs
                slot = self._ensure_encoded(steer.concept)
                self._req[rid] = (steer, slot)
            steered[i] = steer is not None
            slots[i] = slot
            steps[i], dt = self.integration(steer)
            dts.append(dt)
        dt_req = torch.stack(dts) if n_reqs else self._dt(0.0, 1)[:0]
        self.publish(steered, slots, steps, dt_req, np.asarray(num_scheduled_tokens[:n_reqs]))

    def publish(self, steered: np.ndarray, slots: np.ndarray, steps: np.ndarray, dt: torch.Tensor,
                counts: np.ndarray) -> None:
        """Per-request values (batch order) and tokens per request -> this step's per-token buffers.

        Also sets the host-side facts the forward pass reads instead of syncing on device data.
        """
        self._refresh_concepts()
        dt_tok = torch.repeat_interleave(dt, torch.from_numpy(counts.astype(np.int64, copy=False)))
        token_slots = np.repeat(slots, counts)
        self.buffers.publish(np.repeat(steered, counts), dt_tok, token_slots, np.repeat(steps, counts))
        scheduled = counts > 0
        self.any_steered = bool((steered & scheduled).any())
        self.step_count = int(steps[steered & scheduled].max()) if self.any_steered else 0
        self.table.token_slots = self.buffers.slot
        if self.group_by_length:
            self.table.plan_step(token_slots, self.buffers.slot, self.buffers.stage_order)

    def admit(self, rid: str, extra_args: Mapping[str, Any] | None, *, resumed: bool = False
              ) -> tuple[Steering | None, int]:
        """A request joins the batch: read its steering, hold a reference to its concept's slot.

        `resumed`: the request ran before (Model Runner V2 drops preempted requests and adds them
        again), so it is not counted as a new steered request.
        """
        steer = Steering.from_request(extra_args)  # validated once, in the front end; the scheduler failed invalid ones
        slot = 0
        if steer is not None:
            slot = self._ensure_encoded(steer.concept)
            if not resumed:
                self.steered_requests += 1
        self._req[rid] = (steer, slot)
        return steer, slot

    def integration(self, steer: Steering | None) -> tuple[int, torch.Tensor]:
        """A request's Euler steps and step size dt (0 steps, dt 0 when unsteered)."""
        if steer is None:
            return 0, self._dt(0.0, 1)
        n = steer.n_steps or self.n_steps
        return n, self._dt(steer.flowtime, n)

    def _dt(self, flowtime: float, n_steps: int) -> torch.Tensor:
        dt = self._dt_cache.get((flowtime, n_steps))
        if dt is None:
            dt = euler_dt(flowtime, n_steps, self.flow.dtype)
            if len(self._dt_cache) < 4096:
                self._dt_cache[(flowtime, n_steps)] = dt
        return dt


# ---------------------------------------------------------------------------
# concept encoder on vLLM's own layers


class _DenseCausal(nn.Module):
    """Stands in for a layer's paged `Attention` while a concept is encoded outside the engine step."""

    def __init__(self, self_attn, cap: float | None):
        super().__init__()
        self.num_heads = self_attn.num_heads
        self.num_kv_heads = self_attn.num_kv_heads
        self.head_dim = self_attn.head_dim
        self.scale = self_attn.scaling
        self.cap = cap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        q = q.view(1, n, self.num_heads, self.head_dim)
        k = k.view(1, n, self.num_kv_heads, self.head_dim)
        v = v.view(1, n, self.num_kv_heads, self.head_dim)
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
        return dense_causal_attention(q, k, v, allowed, self.scale, self.cap).reshape(n, -1)


@contextlib.contextmanager
def _dense_attention(layers, cap: float | None):
    saved = [layer.self_attn.attn for layer in layers]
    try:
        for layer in layers:
            layer.self_attn.attn = _DenseCausal(layer.self_attn, cap)
        yield
    finally:
        for layer, attn in zip(layers, saved):
            layer.self_attn.attn = attn


def encode_concept(model, ids: Sequence[int]) -> torch.Tensor:
    """Embedding + decoder layers 0-1 (plain causal, softcap on) + final norm -> [Lc, H], model dtype."""
    device = model.embed_tokens.weight.device
    x = torch.tensor(list(ids), dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)
    layers = [model.layers[0], model.layers[1]]
    hidden, residual = model.embed_input_ids(x), None
    with _dense_attention(layers, getattr(model.config, "attn_logit_softcapping", None)):
        for layer in layers:  # never steered here, even where layer L is 0 or 1: `forward` runs no hook
            hidden, residual = layer.forward(positions, hidden, residual)
    out, _ = model.norm(hidden, residual)
    return out
