"""The flow's paged self-attention over the steered requests only, where the attention backend allows it.

vLLM builds one attention metadata per step, for every scheduled token, and the flow's own attention layers
read it from the forward context like the base model's layers do. On the skip path the flow computes only
the steered tokens, but attention under the step's metadata runs over every request: an unsteered request's
decode token reads its whole context from the flow's KV layers, results nobody uses (in a 10%-steered step
on CPU this was the largest part of the flow). For the length of one flow call, `SteeredAttention.narrowed` hands
the flow's layers metadata and slot mappings narrowed to the steered requests (a steered request's tokens
are all steered, and the flow's rows list them in batch order), built once per step and metadata object.
Not with a KV connector (it saves each layer's KV with that layer's metadata).

Narrowing is backend-specific: a `Narrower` per metadata class, registered by qualified name (nothing is
imported for backends that are not in use). vLLM's CPU backend has one; its FlashAttention and Triton
backends (the GPU defaults: FlashAttention on Hopper) share one, which gathers on the device from request
indices staged with the step's rows, so a step between CUDA-graph pieces never waits for the GPU (reviewed;
on CPU, vLLM's Triton backend and kernels run it under Triton's interpreter; not run on a GPU). FlashInfer
has none. Any other backend, or a step the narrower does not recognise (its request layout is not the one
the step's rows were built from), keeps the whole-step attention (`flow_rows.RowsCore` scatters the rows
into a full step), which is always correct; a narrower that raises turns narrowing off for the process.
Either way a request's attention is the backend's kernel over its own context. On CPU the kernel's work
schedule splits long contexts by what else the batch holds (VLLM_CPU_ATTN_SPLIT_KV), for the base model's
layers as for these, which moves last bits at long contexts; narrowed, a steered request's schedule
depends on the other steered requests only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from flas_vllm.engine.step_state import StepState

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class SteeredRequests:
    """The step's steered requests, as a narrower reads them: host arrays, and device copies staged while the
    step was prepared (`StepState.steered_layout`; a narrower never reads device memory on the host: no sync)."""

    request_tokens: np.ndarray  # every request's scheduled tokens, batch order
    requests: np.ndarray  # the steered requests' batch indices
    rows: torch.Tensor  # their tokens, in batch order (device)
    request_index: torch.Tensor  # `requests` on the device
    query_start_loc: torch.Tensor  # their query_start_loc, int32, on the device

    @property
    def query_lens(self) -> np.ndarray:
        return self.request_tokens[self.requests]


# metadata, one of the layers it serves, the step's steered requests -> metadata for those requests only, or
# None (not narrowable)
Narrower = Callable[[object, torch.nn.Module, SteeredRequests], "object | None"]
NARROWERS: dict[str, Narrower] = {}


def narrower(*qualnames: str):
    """Register a narrower for the metadata classes `module:Class`."""
    def register(fn: Narrower) -> Narrower:
        for qualname in qualnames:
            NARROWERS[qualname] = fn
        return fn
    return register


@narrower("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata")
def narrow_cpu_metadata(meta, layer, steered: SteeredRequests):
    """vLLM's CPU backend: the steered requests' rows of its per-request tensors, its work schedule rebuilt
    for them as its metadata builder builds it (the flow's layers have no sliding window)."""
    from vllm import _custom_ops as ops  # lazy: vLLM's compiled ops, only where this backend runs
    from vllm import envs  # lazy, with the ops above

    if (meta.use_sdpa_prefill or meta.dynamic_causal is not None or meta.encoder_cache is not None
            or meta.query_start_loc.device.type != "cpu"):
        return None
    query_start = meta.query_start_loc.numpy()
    if len(query_start) != len(steered.request_tokens) + 1 or not np.array_equal(np.diff(query_start),
                                                                               steered.request_tokens):
        return None  # not the request layout the step's rows were built from
    index, query_start_loc = steered.request_index, steered.query_start_loc
    query_lens = steered.query_lens
    seq_lens = meta.seq_lens.index_select(0, index)
    impl = layer.impl
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(steered.requests), num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_size, seq_lens=seq_lens, dtype=layer.dtype, query_start_loc=query_start_loc,
        causal=meta.causal, sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None, kv_cache_dtype=impl.kv_cache_dtype)
    return dataclasses.replace(
        meta, num_actual_tokens=int(query_lens.sum()), max_query_len=int(query_lens.max()),
        query_start_loc=query_start_loc, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
        block_table=meta.block_table.index_select(0, index), slot_mapping=meta.slot_mapping.index_select(0, steered.rows),
        scheduler_metadata=schedule)  # (the KV cache update reads the forward context's slot mapping, narrowed too)


# Features of the GPU backends' metadata that narrowing does not carry over: set, the step keeps its whole metadata.
_UNNARROWED_GPU_FEATURES = ("dcp_context_kv_lens", "mm_prefix_query_range_tensor", "mm_prefix_range",
                            "mm_prefix_range_tensor", "rswa_prefix_lens")


@narrower("vllm.v1.attention.backends.flash_attn:FlashAttentionMetadata",
          "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadata")
def narrow_varlen_gpu_metadata(meta, layer, steered: SteeredRequests):
    """vLLM's FlashAttention and Triton backends (varlen queries over a paged KV cache; the GPU defaults): the
    steered requests' rows of the per-request tensors, gathered on the device from indices staged without a
    sync. `max_seq_len` stays the step's, a bound on the steered requests' (the kernels read each request's
    own length from `seq_lens`); the backend's ahead-of-time schedule, built for the whole step, is dropped
    (FlashAttention then schedules the call itself; Triton does not use it). Reviewed against vLLM 0.32 and
    0.33's source; tested on CPU tensors and with vLLM's Triton kernels under Triton's interpreter; not run on
    a GPU."""
    if meta.causal is not True or any(getattr(meta, name, None) is not None for name in _UNNARROWED_GPU_FEATURES):
        return None
    if (meta.query_start_loc.shape[0] != len(steered.request_tokens) + 1
            or meta.num_actual_tokens != int(steered.request_tokens.sum())):
        return None  # padded for a graph, or not the request layout the step's rows were built from
    index, query_start_loc = steered.request_index, steered.query_start_loc
    query_lens = steered.query_lens
    return dataclasses.replace(
        meta, num_actual_tokens=int(query_lens.sum()), max_query_len=int(query_lens.max()),
        query_start_loc=query_start_loc, seq_lens=meta.seq_lens.index_select(0, index),
        block_table=meta.block_table.index_select(0, index), slot_mapping=meta.slot_mapping.index_select(0, steered.rows),
        scheduler_metadata=None)


def narrower_for(meta) -> Narrower | None:
    cls = type(meta)
    return NARROWERS.get(f"{cls.__module__}:{cls.__qualname__}")


def narrowed_entries(layers: Sequence[torch.nn.Module], state: StepState, metadata, slot_mapping) -> list | None:
    """(layer name, narrowed metadata, narrowed slot mapping or None) for every layer, or None: keep the whole step.

    All or nothing: one layer that cannot be narrowed keeps every layer on the whole step (the flow's cores
    take one kind of rows)."""
    if (not layers or state.rows is None or state.steered_layout is None or not isinstance(metadata, dict)
            or not isinstance(slot_mapping, dict)):
        return None
    steered = SteeredRequests(state.request_tokens, state.steered_requests, state.rows[: state.steered_rows],
                              *state.steered_layout)
    narrowed: dict[int, object] = {}  # by metadata object and by slot mapping: the flow's layers usually share one
    entries = []
    for layer in layers:
        name = layer.layer_name
        meta, mapping = metadata.get(name), slot_mapping.get(name)
        narrow = narrower_for(meta)
        if narrow is None:
            return None
        if id(meta) not in narrowed:
            narrowed[id(meta)] = narrow(meta, layer, steered)
        if narrowed[id(meta)] is None:
            return None
        if mapping is not None and id(mapping) not in narrowed:
            narrowed[id(mapping)] = mapping.index_select(0, steered.rows)
        entries.append((name, narrowed[id(meta)], None if mapping is None else narrowed[id(mapping)]))
    return entries


class SteeredAttention:
    """The flow's attention layers, narrowed per flow call where the step and the backend allow it."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.layers = list(layers)
        self.enabled = True  # off for good after a narrower failed: the whole-step attention is always correct

    @contextlib.contextmanager
    def narrowed(self, state: StepState) -> Iterator[bool]:
        """While one flow call runs: the layers see the step's steered requests only. Yields True if they do
        (the flow's cores then take the steered rows alone), False if the step keeps the whole-step attention."""
        from vllm.distributed.kv_transfer import has_kv_transfer_group  # lazy: the engine's runtime only
        from vllm.forward_context import get_forward_context  # lazy, with the import above

        context = get_forward_context()
        metadata, slot_mapping = context.attn_metadata, context.slot_mapping
        entries = None
        # a KV connector saves each layer's KV with its metadata: it gets the whole step's
        if self.enabled and state.rows is not None and not has_kv_transfer_group():
            try:
                entries = narrowed_entries(self.layers, state, metadata, slot_mapping)
            except Exception:  # a vLLM change the narrower does not know: never worth a crashed engine
                logger.exception("FLAS: narrowing the flow's attention to the steered requests failed; "
                                 "the flow's attention covers whole steps from now on")
                self.enabled = False
        if entries is None:
            yield False
            return
        saved = [(name, metadata[name], slot_mapping.get(name)) for name, _, _ in entries]
        try:
            for name, meta, mapping in entries:
                metadata[name] = meta
                if mapping is not None:
                    slot_mapping[name] = mapping
            yield True
        finally:
            for name, meta, mapping in saved:
                metadata[name] = meta
                if mapping is not None:
                    slot_mapping[name] = mapping
