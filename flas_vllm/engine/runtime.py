"""Per-step plumbing between vLLM's model runner and the steered forward pass.

Before each forward, the runner hook (patches/runner_hook.py) hands us the
step's requests in batch order. We resolve each request's steering, make sure
its concept is encoded in the slot table, and write per-token data (steered
mask, dt, concept slot) IN PLACE into persistent buffers, which is what a
trace-once compiled graph (and, on GPUs, a captured CUDA graph) reads.
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
from flas_vllm.engine.concept_cache import ConceptSlotTable
from flas_vllm.core.concept_encoder import encode_with_decoder
from flas_vllm.core.config import FlasEngineOptions, FlowGeometry
from flas_vllm.core.flow import FlowFunction, cross_attend_heads, dense_causal_attention, euler_dt, expand_concept_kv
from flas_vllm.core.steering import Steering, read_canonical

logger = logging.getLogger(__name__)


LENGTH_BUCKET = 16  # concept key lengths are padded to a multiple of this when steps are grouped
ATTEND_WORKSPACE_BYTES = 256 << 20  # gathered concept keys + values of one chunk of tokens, per attend


def attend_slots(q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor, cap: float | None, chunk: int) -> torch.Tensor:
    """Each token's cross-attention to its own slot's keys, `chunk` tokens at a time.

    q [n, nH, D]; slots [n]; keys/values [slots, nH, L, D]; valid [slots, L]. A
    token's gathered keys and values take nH*L*D elements each (at Gemma-2-2B
    geometry and 16384 tokens, 4 GiB per tensor all at once), so they are gathered
    one chunk at a time. Per-token arithmetic does not depend on the chunking.
    """
    n = q.shape[0]
    if n <= chunk:
        return _attend_rows(q, slots, keys, values, valid, cap)
    out = torch.empty_like(q)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        out[start:end] = _attend_rows(q[start:end], slots[start:end], keys, values, valid, cap)
    return out


def _attend_rows(q, slots, keys, values, valid, cap):
    kk = keys.index_select(0, slots)  # [n, nH, L, D], contiguous
    vv = values.index_select(0, slots)
    return cross_attend_heads(q[:, None], kk, vv, valid.index_select(0, slots), cap)[:, 0]


@torch.library.custom_op("flas::attend_slots", mutates_args=())
def _attend_slots_op(q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     valid: torch.Tensor, cap: float | None, chunk: int) -> torch.Tensor:
    """`attend_slots` as one opaque op for traced graphs: its chunk loop follows the token count at run
    time (a compiled graph has a symbolic count; a captured CUDA graph runs it at its capture size)."""
    return attend_slots(q, slots, keys, values, valid, cap, chunk)


@_attend_slots_op.register_fake
def _(q, slots, keys, values, valid, cap, chunk):
    return torch.empty_like(q)


class SlotTableKV(nn.Module):
    """Per-block concept keys/values in a fixed table; each token reads its own slot.

    Stored already expanded to query heads ([slot, nH, Lc, D], see `expand_concept_kv`)
    so a step gathers each token's keys in one copy instead of three.

    Where the step may branch on data (no CUDA graphs: the flow runs as an opaque op),
    `plan_step` groups tokens by their concept's length rounded up to LENGTH_BUCKET and
    each group gathers and attends over that many key positions instead of the full
    `concept_max_len`: most concepts are far shorter, and the gather is the flow's
    largest memory cost. A token's arithmetic depends only on its own concept, never on
    the rest of the batch, so mixed batches stay bit-identical to solo runs.
    """

    def __init__(self, g: FlowGeometry, num_blocks: int, capacity: int, max_len: int, dtype, device):
        super().__init__()
        shape = (num_blocks, capacity + 1, g.num_heads, max_len, g.head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        valid = torch.zeros(capacity + 1, max_len, dtype=torch.bool, device=device)
        valid[0, 0] = True  # the null slot attends to one zero key: finite, and never used
        self.register_buffer("valid", valid, persistent=False)
        self.cap = g.attn_logit_softcapping
        self.num_heads = g.num_heads
        self.head_dim = g.head_dim
        self.max_len = max_len
        self.workspace_bytes = ATTEND_WORKSPACE_BYTES
        self.token_slots: torch.Tensor | None = None
        # host copy: each slot's key length rounded up to LENGTH_BUCKET (the null slot: one bucket)
        self.bucket_len = np.full(capacity + 1, min(LENGTH_BUCKET, max_len), dtype=np.int64)
        self.groups: list[tuple[int, torch.Tensor | None, torch.Tensor]] | None = None

    def plan_step(self, token_slots: np.ndarray, device_slots: torch.Tensor) -> None:
        """Group this step's tokens by bucketed concept length: [(length, token index or None, slots)]."""
        lengths = self.bucket_len[token_slots]
        found = np.unique(lengths)
        if len(found) == 1:
            self.groups = [(int(found[0]), None, device_slots[: len(token_slots)])]
            return
        self.groups = []
        for length in found:
            idx = torch.from_numpy(np.nonzero(lengths == length)[0]).to(device_slots.device)
            self.groups.append((int(length), idx, device_slots.index_select(0, idx)))

    def attend(self, block: int, q: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        groups = self.groups
        if groups is None or sum(n if idx is None else len(idx) for _, idx, _ in groups) != n:
            groups = [(self.max_len, None, self.token_slots[:n])]  # traced graphs: one full-length gather
        out = None if len(groups) == 1 else torch.empty_like(q)
        for length, idx, slots in groups:
            qg = q if idx is None else q.index_select(0, idx)
            keys, values = self.keys[block, :, :, :length], self.values[block, :, :, :length]
            valid = self.valid[:, :length]
            chunk = self.chunk_tokens(length, q.element_size())
            attend = _attend_slots_op if torch.compiler.is_compiling() else attend_slots
            res = attend(qg, slots, keys, values, valid, self.cap, chunk)
            if out is None:
                return res
            out.index_copy_(0, idx, res)
        return out

    def chunk_tokens(self, length: int, itemsize: int) -> int:
        """Tokens per gather so that one chunk's keys + values fit in `workspace_bytes`."""
        per_token = 2 * self.num_heads * length * self.head_dim * itemsize
        return max(1, self.workspace_bytes // per_token)

    @torch.inference_mode()
    def write(self, slot: int, per_block_kv: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        n = None
        for b, kv in enumerate(per_block_kv):
            if kv is None:
                continue
            k, v = kv
            n = k.shape[0]
            self.keys[b, slot].zero_()
            self.values[b, slot].zero_()
            self.keys[b, slot, :, :n] = expand_concept_kv(k, self.num_heads)
            self.values[b, slot, :, :n] = expand_concept_kv(v, self.num_heads)
        self.valid[slot].zero_()
        self.valid[slot, : (n or 1)] = True
        self.bucket_len[slot] = min(self.max_len, -(-(n or 1) // LENGTH_BUCKET) * LENGTH_BUCKET)


class StepBuffers(nn.Module):
    """Per-token steering data, preallocated at max_num_batched_tokens and updated in place.

    `steps` is each token's own number of Euler steps (its request's n_steps).
    """

    def __init__(self, max_tokens: int, flow_dtype, device):
        super().__init__()
        self.register_buffer("steered", torch.zeros(max_tokens, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("dt", torch.zeros(max_tokens, dtype=flow_dtype, device=device), persistent=False)
        self.register_buffer("slot", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("steps", torch.zeros(max_tokens, dtype=torch.int32, device=device), persistent=False)
        pin = device is not None and torch.device(device).type == "cuda"
        # Host staging: on GPUs the copies are non-blocking from pinned memory (async scheduling safe).
        # device="cpu" explicitly: vLLM builds the model inside `with torch.device(<gpu>)`.
        host = dict(device="cpu", pin_memory=pin)
        self._host_steered = torch.zeros(max_tokens, dtype=torch.bool, **host)
        self._host_dt = torch.zeros(max_tokens, dtype=flow_dtype, **host)
        self._host_slot = torch.zeros(max_tokens, dtype=torch.long, **host)
        self._host_steps = torch.zeros(max_tokens, dtype=torch.int32, **host)
        self.max_tokens = max_tokens

    def publish(self, steered: np.ndarray, dt: torch.Tensor, slot: np.ndarray, steps: np.ndarray) -> None:
        n = len(steered)
        if n > self.max_tokens:
            raise RuntimeError(f"step has {n} tokens, more than max_num_batched_tokens={self.max_tokens}")
        self._host_steered[:n] = torch.from_numpy(steered)
        self._host_steered[n:] = False
        self._host_dt[:n] = dt
        self._host_slot[:n] = torch.from_numpy(slot)
        self._host_slot[n:] = 0
        self._host_steps[:n] = torch.from_numpy(steps)
        self._host_steps[n:] = 0
        self.steered.copy_(self._host_steered, non_blocking=True)
        self.dt.copy_(self._host_dt, non_blocking=True)
        self.slot.copy_(self._host_slot, non_blocking=True)
        self.steps.copy_(self._host_steps, non_blocking=True)


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
        self.slots = ConceptSlotTable(options.max_concepts, options.max_pinned)
        self._tokenizer_name = tokenizer_name
        self._tokenizer_kwargs = dict(tokenizer_kwargs)
        self._tokenizer = None
        self.own_encoder = own_encoder  # a checkpoint's own concept encoder (`concept_enc`), if any
        self._req: dict[str, tuple[Steering | None, int]] = {}  # req_id -> (steering, slot)
        self._dt_cache: dict[tuple[float, int], torch.Tensor] = {}
        self.steered_requests = 0
        # Host-side facts about the current step, so the model never syncs on device data:
        self.any_steered = False  # is any token of this step steered?
        self.step_count = 0  # the most Euler steps any steered token of this step needs
        self.group_by_length = False  # set by the model where the flow may branch on data (no CUDA graphs)

    # -- concepts ---------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name, **self._tokenizer_kwargs)
        return self._tokenizer

    def _ensure_encoded(self, concept: str, pin: bool = False) -> int:
        slot, fresh = self.slots.pin(concept) if pin else self.slots.acquire(concept)
        if fresh:
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
        return slot

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
        return out

    # -- per step -----------------------------------------------------------------

    def finish(self, rid: str) -> None:
        """Drop a finished or aborted request and release its concept slot reference."""
        entry = self._req.pop(rid, None)
        if entry is not None and entry[0] is not None:
            self.slots.release(entry[1])

    def prepare_step(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray,
                     requests: Mapping[str, Any]) -> None:
        for gone in [r for r in self._req if r not in requests]:
            self.finish(gone)  # normally already done by the runner's request-removed hook
        n_reqs = len(req_ids)
        steered = np.zeros(n_reqs, dtype=bool)
        slots = np.zeros(n_reqs, dtype=np.int64)
        steps = np.zeros(n_reqs, dtype=np.int32)
        dts = []
        zero = self._dt(0.0, 1)
        for i, rid in enumerate(req_ids):
            entry = self._req.get(rid)
            if entry is None:
                entry = self._admit(rid, requests[rid])
            steer, slot = entry
            if steer is not None and self.slots.slot_of(steer.concept) != slot:
                # evicted while preempted: encode again before it runs
                slot = self._ensure_encoded(steer.concept)
                self._req[rid] = (steer, slot)
            steered[i] = steer is not None
            slots[i] = slot
            if steer is not None:
                steps[i] = steer.n_steps or self.n_steps
                dts.append(self._dt(steer.flowtime, int(steps[i])))
            else:
                dts.append(zero)
        counts = np.asarray(num_scheduled_tokens[:n_reqs])
        dt_tok = torch.repeat_interleave(torch.stack(dts), torch.from_numpy(counts)) if n_reqs else zero[:0]
        token_slots = np.repeat(slots, counts)
        self.buffers.publish(np.repeat(steered, counts), dt_tok, token_slots, np.repeat(steps, counts))
        scheduled = counts > 0
        self.any_steered = bool((steered & scheduled).any())
        self.step_count = int(steps[scheduled].max()) if self.any_steered else 0
        self.table.token_slots = self.buffers.slot
        if self.group_by_length:
            self.table.plan_step(token_slots, self.buffers.slot)

    def _admit(self, rid: str, request_state: Any) -> tuple[Steering | None, int]:
        params = getattr(request_state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) if params is not None else None
        steer = read_canonical(extra)  # validated once, in the front end; the scheduler failed invalid ones
        slot = 0
        if steer is not None:
            slot = self._ensure_encoded(steer.concept)
            self.steered_requests += 1
        self._req[rid] = (steer, slot)
        return steer, slot

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
        for layer in layers:  # never steered here, even where layer L is 0 or 1
            forward = getattr(layer, "flas_unsteered_forward", layer)
            hidden, residual = forward(positions, hidden, residual)
    out, _ = model.norm(hidden, residual)
    return out
