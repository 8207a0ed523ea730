"""Per-step plumbing between vLLM's model runner and the steered forward pass.

Before each forward, the runner tells us the step's requests in batch order:
the V1 runner through its hook (patches/runner_hook.py, `prepare_step`), Model
Runner V2 through FLAS's model-state class (model_state.py), which keeps one
row per request. Either way a request's steering is read once when it joins,
its concept is encoded into the slot table, and each step the runner hands
`publish` one row per request (step_state.RequestRow); `build_step` makes the
step's state from them, its per-token values written IN PLACE into persistent
buffers, which is what a trace-once compiled graph (and, on GPUs, a captured
CUDA graph) reads.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from flas_vllm.core.concept import tokenize_concept
from flas_vllm.engine.concept_cache import ConceptSlots
from flas_vllm.engine.graph_buckets import graph_flow_rows, min_bucket
from flas_vllm.core.concept_encoder import encode_with_decoder, token_ids_on
from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.flow import FlowFunction, dense_causal_attention
from flas_vllm.core.steering import Steering
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step, request_row

logger = logging.getLogger(__name__)

FLOW_LOG_STEPS = 4096  # steps whose flow rows the runtime remembers (tests, debugging)


class Admitted(NamedTuple):
    """A request in flight: its steering, its concept's slot, and its row (made once: every step reads it)."""

    steer: Steering | None
    slot: int
    row: RequestRow


class FlasRuntime:
    """Request -> steering -> concept slot bookkeeping for one model instance (one worker)."""

    def __init__(self, model, options: FlasEngineOptions, flow: FlowFunction, n_steps: tuple[int, int],
                 concept_max_len: int, table: SlotTableKV, state: StepState, tokenizer_name: str,
                 tokenizer_kwargs: Mapping[str, Any], own_encoder: nn.Module | None = None):
        self.model = model  # the vLLM text decoder whose layers 0-1 encode concepts
        self.options = options
        self.flow = flow
        self.flow_dtype = flow.dtype  # read per request row; weight reloads keep the checkpoint's dtype
        self.n_steps, self.max_n_steps = n_steps  # a request's default, and the most it may ask for
        self.concept_max_len = concept_max_len
        self.table = table
        self.state = state  # the engine step's per-token steering, built by `publish`
        self.slots = ConceptSlots(options.max_concepts, options.max_pinned)
        self._tokenizer_name = tokenizer_name
        self._tokenizer_kwargs = dict(tokenizer_kwargs)
        self._tokenizer = None
        self.own_encoder = own_encoder  # a checkpoint's own concept encoder (`concept_enc`), if any
        self._stale = False  # concepts in the table were encoded with weights since replaced
        self._req: dict[str, Admitted] = {}
        self.steered_requests = 0
        self.profile_flow_rows = 0  # tokens the flow ran on in dummy batches (counted on the skip path)
        # the skip path's real steps: rows the flow computed (bucket-padded), steered tokens, steps with flow work
        self.flow_rows = self.steered_tokens = self.flow_steps = 0
        self.flow_attention_tokens = 0  # tokens the flow's paged self-attention covered (steered_attention.py)
        self.flow_log: collections.deque = collections.deque(maxlen=FLOW_LOG_STEPS)  # recent (tokens, steered, rows)
        self.group_by_length = False  # set by the model where the flow may branch on data (no CUDA graphs)
        self.flow_path = "graph"  # "skip" (the op), "bucketed" (the op, bucketed FULL graphs) or "graph" (traced)
        self.capture_rows: int | None = None  # the bucket a FULL graph is being captured for (`capturing`)
        self.graph_bucket_min = min_bucket()  # the smallest bucket below a graph's size (graph_buckets.py)
        self.model_runner = "v1"  # which vLLM runner publishes the steps: "v2" once its model state exists

    # -- concepts ---------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # lazy: transformers is heavy

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
        self.load_tokenizer()

    def load_tokenizer(self) -> None:
        """Load the concept tokenizer at start-up, not inside the first steered request's step (a stall of
        every request in that batch). A tokenizer that cannot load does not stop an engine that may serve
        unsteered traffic only: it is logged, and each steered request's encoding raises the error again."""
        try:
            self.tokenizer
        except Exception as err:  # noqa: BLE001 - surfaced again, unchanged, by the first concept encoding
            logger.warning("FLAS: concept tokenizer %r did not load (%s: %s); steered requests will fail until "
                           "it does", self._tokenizer_name, type(err).__name__, err)

    def _refresh_concepts(self) -> None:
        if not self._stale:
            return
        self._stale = False
        if self.state.times is not None:  # first: it needs no tokenizer, so a concept that fails cannot skip it
            self.state.times.refill(self.flow)
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
        out["flow_path"] = self.flow_path
        out["model_runner"] = self.model_runner
        out["profile_flow_rows"] = self.profile_flow_rows
        out["flow_rows"], out["steered_tokens"], out["flow_steps"] = self.flow_rows, self.steered_tokens, self.flow_steps
        out["flow_attention_tokens"] = self.flow_attention_tokens
        out["tokenizer_loaded"] = self._tokenizer is not None
        times = self.state.times
        out["time_rows_in_use"] = times.rows_in_use() if times is not None else 0
        out["time_rows_filled"] = times.fills if times is not None else 0
        return out

    # -- per step -----------------------------------------------------------------

    def count_flow_rows(self, steered: int, rows: int) -> None:
        """A step ran the flow on `rows` rows for `steered` steered tokens (stats; the graph path counts
        a step's tokens before CUDA-graph padding)."""
        self.flow_steps += 1
        self.steered_tokens += steered
        self.flow_rows += rows
        self.flow_log.append((self.state.n_tokens, steered, rows))

    def graph_flow_rows(self, num_tokens: int) -> int:
        """The steered bucket of this step at `num_tokens` (padded) tokens: the FULL graph it replays
        (graph_buckets.py). While a graph is captured, its bucket; in other dummy batches, every token."""
        if self.capture_rows is not None:
            return min(self.capture_rows, num_tokens)
        if self.state.profiling:
            return num_tokens
        return graph_flow_rows(self.state.steered_rows, num_tokens, self.graph_bucket_min)

    @contextlib.contextmanager
    def capturing(self, rows: int | None):
        """vLLM captures a FULL graph for the steered bucket `rows` (patches/graph_dispatch.py)."""
        self.capture_rows = rows
        try:
            yield
        finally:
            self.capture_rows = None

    def finish(self, rid: str) -> None:
        """Drop a finished or aborted request and release its concept slot reference."""
        entry = self._req.pop(rid, None)
        if entry is not None and entry.steer is not None:
            self.slots.release(entry.slot)
            if entry.row.time_row:
                self.state.times.release(entry.row.time_row)

    def prepare_step(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray,
                     requests: Mapping[str, Any]) -> None:
        """V1 runner (patches/runner_hook.py): the step's requests in batch order, then its tokens."""
        for gone in [r for r in self._req if r not in requests]:
            self.finish(gone)  # normally already done by the runner's request-removed hook
        rows = []
        for rid in req_ids:
            entry = self._req.get(rid)
            if entry is None:
                params = getattr(requests[rid], "sampling_params", None)
                entry = self.admit(rid, getattr(params, "extra_args", None))
            if entry.steer is not None and self.slots.slot_of(entry.steer.concept) != entry.slot:
                # evicted while preempted: encode again before it runs
                entry = self._admitted(entry.steer, self._ensure_encoded(entry.steer.concept), entry.row.time_row)
                self._req[rid] = entry
            rows.append(entry.row)
        self.publish(StepRows.of(rows, np.asarray(num_scheduled_tokens[: len(req_ids)])))

    def publish(self, rows: StepRows) -> None:
        """The step's rows (batch order) -> its per-token state (one function builds it: `build_step`).

        While a dummy batch runs (`profiling`), every request of it steers as `profile_row`, and every
        token gathers the full concept length, the most any can.
        """
        self._refresh_concepts()
        if self.state.profiling:
            rows = rows.all_as(self.profile_row())
        grouped = self.group_by_length and not self.state.profiling
        build_step(self.state, rows, self.table.bucket_len if grouped else None)
        if not self.group_by_length and not self.state.profiling and self.state.n_tokens:
            # the graph path: the traced flow runs on every token of every step (the op path counts its own)
            self.count_flow_rows(self.state.steered_rows, self.state.n_tokens)

    def row(self, steer: Steering | None, slot: int) -> RequestRow:
        """A request's row: its Euler steps (or the engine's default), step size and concept slot."""
        return request_row(steer, slot, self.n_steps, self.flow_dtype)

    def _admitted(self, steer: Steering | None, slot: int, time_row: int | None = None) -> Admitted:
        """The entry of a request (its time-embedding row taken here, or the one it already holds)."""
        row = self.row(steer, slot)
        if steer is not None and self.state.times is not None:
            if time_row is None:
                time_row = self.state.times.acquire(row.dt, self.flow)
            row = dataclasses.replace(row, time_row=time_row)
        return Admitted(steer, slot, row)

    def profile_row(self) -> RequestRow:
        """What a dummy batch's tokens steer as: the null slot (no concept is touched), every Euler step
        any request may take, a nonzero flowtime so the flow's arithmetic really runs."""
        return self.row(Steering(concept="", flowtime=1.0, n_steps=self.max_n_steps), 0)

    @contextlib.contextmanager
    def profiling(self):
        """A dummy batch (vLLM's memory profiling, warm-up, graph capture; patches/dummy_runs.py): every
        token runs the flow at max Euler steps, so the memory vLLM measures includes the flow's."""
        self.state.profiling = True
        try:
            self.publish(StepRows.of([RequestRow()], [self.state.buffers.max_tokens]))  # V1 publishes no more
            yield
        finally:
            self.state.profiling = False
            self.publish(StepRows.of([], []))  # nothing steered leaks into the next step

    def admit(self, rid: str, extra_args: Mapping[str, Any] | None, *, resumed: bool = False) -> Admitted:
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
        self._req[rid] = entry = self._admitted(steer, slot)
        return entry


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
    x = token_ids_on(device, ids)
    positions = torch.arange(len(ids), device=device)
    layers = [model.layers[0], model.layers[1]]
    hidden, residual = model.embed_input_ids(x), None
    with _dense_attention(layers, getattr(model.config, "attn_logit_softcapping", None)):
        for layer in layers:  # never steered here, even where layer L is 0 or 1: `forward` runs no hook
            hidden, residual = layer.forward(positions, hidden, residual)
    out, _ = model.norm(hidden, residual)
    return out
