"""Each steered token's concept keys and values, read from a fixed table of concept slots.

A concept is encoded once into a slot; every token of a request steered by it
gathers that slot's keys and values for the flow's cross-attention. The table
is preallocated, so a traced graph (or a captured CUDA graph) reads the same
memory every step.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from flas_vllm.core.config import FlowGeometry
from flas_vllm.core.flow import cross_attend_heads
from flas_vllm.engine.concept_attention import FlexSlotAttention, attend_slots_flex_op, use_flex

if TYPE_CHECKING:
    from flas_vllm.engine.step_state import StepState  # typing only


LENGTH_BUCKET = 16  # concept key lengths are padded to a multiple of this when steps are grouped
# gathered concept keys + values of one chunk of tokens per attend, or of a whole flow call's kept gathers
ATTEND_WORKSPACE_BYTES = 256 << 20


class GatherSpace:
    """Where eager gathers put each token's copy of its concept's keys and values.

    On CPU a fresh tensor of a few hundred MiB is page-faulted in on every gather (large blocks go
    back to the OS when freed), which costs twice the copy itself; one persistent buffer, grown to the
    largest call so far (at most `nbytes`) and carved out per gather, avoids that. On a GPU the caching
    allocator already reuses memory: fresh tensors there, nothing held beyond what vLLM's profiling saw.
    """

    def __init__(self, nbytes: int, dtype: torch.dtype, device):
        self.dtype, self.device = dtype, torch.device(device)
        self.nbytes = nbytes
        self.capacity = nbytes // torch.empty((), dtype=dtype).element_size()  # elements
        self.persistent = self.device.type == "cpu"
        self.buffer: torch.Tensor | None = None
        self.used = 0  # elements handed out since the last `reset`

    def reset(self, numel: int = 0) -> None:
        """Forget what was handed out (its views must no longer be read); make room for `numel` elements."""
        self.used = 0
        want = min(numel, self.capacity)
        if self.persistent and want and (self.buffer is None or self.buffer.numel() < want):
            self.buffer = None  # released before its successor is allocated
            with torch.inference_mode(False):  # a plain tensor: gathers write into it in and outside inference mode
                self.buffer = torch.empty(want, dtype=self.dtype, device=self.device)

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape`, valid until the next `reset`."""
        numel = math.prod(shape)
        if self.buffer is None or self.used + numel > self.buffer.numel():  # GPU, or more than was reserved
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        out = self.buffer[self.used: self.used + numel].view(shape)
        self.used += numel
        return out


def attend_slots(q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor, cap: float | None, chunk: int, space: GatherSpace | None = None) -> torch.Tensor:
    """Each token's cross-attention to its own slot's keys, `chunk` tokens at a time.

    q [n, nH, D]; slots [n]; keys/values [slots, nKV, L, D]; valid [slots, L]. A
    token's gathered keys and values take nKV*L*D elements each (at Gemma-2-2B
    geometry and 16384 tokens, 2 GiB per tensor all at once), so they are gathered
    one chunk at a time (into `space` when given, reused by every chunk). Per-token
    arithmetic does not depend on the chunking.
    """
    n = q.shape[0]
    if n <= chunk:
        return _attend_rows(q, slots, keys, values, valid, cap, space)
    out = torch.empty_like(q)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        out[start:end] = _attend_rows(q[start:end], slots[start:end], keys, values, valid, cap, space)
    return out


def gather_slots(slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                 space: GatherSpace | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's own copy of its slot's keys, values ([n, nKV, L, D], contiguous) and key mask [n, L]."""
    if space is None:
        return keys.index_select(0, slots), values.index_select(0, slots), valid.index_select(0, slots)
    shape = (slots.shape[0], *keys.shape[1:])
    return (torch.index_select(keys, 0, slots, out=space.take(shape)),
            torch.index_select(values, 0, slots, out=space.take(shape)), valid.index_select(0, slots))


def attend_gathered(q: torch.Tensor, gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    cap: float | None) -> torch.Tensor:
    """q [n, nH, D] attending to what `gather_slots` copied for the same n tokens."""
    kk, vv, valid = gathered
    return cross_attend_heads(q[:, None], kk, vv, valid, cap)[:, 0]


def _attend_rows(q, slots, keys, values, valid, cap, space=None):
    if space is not None:  # the previous chunk's copies are no longer read
        space.reset(2 * slots.shape[0] * keys[0].numel())
    return attend_gathered(q, gather_slots(slots, keys, values, valid, space), cap)


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

    Stored head-major at the KV heads ([slot, nKV, Lc, D]): a step gathers each token's keys in one
    contiguous copy, and each KV head's query heads attend to it in one product (`cross_attend_heads`).

    Each row's slot and the step's row groups are read from the step's state (step_state.py); on the
    skip path the flow's rows are the step's steered tokens only, compacted, with their slots gathered.
    Where the step may branch on data (no CUDA graphs: the flow runs as an opaque op),
    the state groups tokens by their concept's length rounded up to LENGTH_BUCKET (`bucket_len`) and
    each group gathers and attends over that many key positions instead of the full
    `concept_max_len`: most concepts are far shorter, and the gather is the flow's
    largest memory cost. A token's arithmetic depends only on its own concept, never on
    the rest of the batch, so mixed batches stay bit-identical to solo runs.

    A token's keys and values are the same at every Euler step, so within `gathers_reused` (one eager
    flow call of the skip path) each (block, group) is gathered once and read by every Euler step, if
    the call's gathers all fit in the gather workspace (`workspace_bytes`, the bound a chunked gather
    keeps); otherwise each Euler step gathers again, in chunks. The same copies either way, so the same
    bits. Eager gathers land in a `GatherSpace`.

    On a CUDA device (`use_flex`) every step instead runs `FlexSlotAttention`: the table is
    read in place by a block-sparse FlexAttention kernel, no gather, no length groups.
    """

    def __init__(self, g: FlowGeometry, num_blocks: int, capacity: int, max_len: int, dtype, device,
                 state: "StepState | None" = None, flex_name: str | None = None,
                 concept_attention: str | None = None):
        super().__init__()
        shape = (num_blocks, capacity + 1, g.num_kv_heads, max_len, g.head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        valid = torch.zeros(capacity + 1, max_len, dtype=torch.bool, device=device)
        valid[0, 0] = True  # the null slot attends to one zero key: finite, and never used
        self.register_buffer("valid", valid, persistent=False)
        self.cap = g.attn_logit_softcapping
        self.num_heads = g.num_heads
        self.num_kv_heads = g.num_kv_heads
        self.head_dim = g.head_dim
        self.max_len = max_len
        self.workspace_bytes = ATTEND_WORKSPACE_BYTES
        self.state = state  # the engine step's per-token steering: each token's slot, the length groups
        # host copy: each slot's key length rounded up to LENGTH_BUCKET (the null slot: one bucket)
        self.bucket_len = np.full(capacity + 1, min(LENGTH_BUCKET, max_len), dtype=np.int64)
        self.space = GatherSpace(self.workspace_bytes, dtype, device)
        # inside `gathers_reused`: the call's gathers by (block, group), or False where they do not fit
        self._reused: dict[tuple[int, int], tuple[torch.Tensor, ...]] | bool | None = None
        self.flex: FlexSlotAttention | None = None
        if use_flex(device, concept_attention):
            self.flex = FlexSlotAttention(capacity + 1, g.num_heads, max_len, self.cap, device,
                                          num_kv_heads=g.num_kv_heads, name=flex_name)
            if state is not None:  # the engine's max batched tokens, now: no trace or capture ever grows them
                self.flex.reserve(state.buffers.max_tokens)

    def attend(self, block: int, q: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        if self.flex is not None:
            return self.attend_flex(block, q)
        groups = self.state.groups
        # Groups planned for other rows than q's: traced graphs (none planned), or a step that CUDA-graph
        # padding lengthened (PIECEWISE graphs: the padded tail is slot 0). One full-length gather then.
        if groups is None or sum(slots.shape[0] for _, _, slots in groups) != n:
            groups = [(self.max_len, None, self.state.slots(n))]
        eager = not torch.compiler.is_compiling()
        reused = self._reused_gathers(groups, q.element_size()) if eager else None
        out = None if len(groups) == 1 else torch.empty_like(q)
        for group, (length, idx, slots) in enumerate(groups):
            qg = q if idx is None else q.index_select(0, idx)
            keys, values = self.keys[block, :, :, :length], self.values[block, :, :, :length]
            valid = self.valid[:, :length]
            if reused is not None:
                if (block, group) not in reused:
                    reused[block, group] = gather_slots(slots, keys, values, valid, self.space)
                gathered = reused[block, group]
                if gathered[0].shape[:3] != (qg.shape[0], self.num_kv_heads, length):  # another row count: a misuse
                    raise RuntimeError(f"concept gathers kept for other rows: {tuple(gathered[0].shape)} "
                                       f"for {qg.shape[0]} rows of length {length}")
                res = attend_gathered(qg, gathered, self.cap)
            else:
                chunk = self.chunk_tokens(length, q.element_size())
                res = (attend_slots(qg, slots, keys, values, valid, self.cap, chunk, self.space) if eager else
                       _attend_slots_op(qg, slots, keys, values, valid, self.cap, chunk))
            if out is None:
                return res
            out.index_copy_(0, idx, res)
        return out

    @contextlib.contextmanager
    def gathers_reused(self):
        """One eager flow call whose steps read the same groups: each (block, group) gathered once, if
        all of them fit in `workspace_bytes` (decided at the call's first attend)."""
        self._reused = {}
        try:
            yield
        finally:
            self._reused = None
            self.space.reset()

    def _reused_gathers(self, groups, itemsize: int) -> dict | None:
        """This call's kept gathers, or None: outside `gathers_reused`, or the call's gathers do not fit."""
        if self._reused is None or self._reused is False:
            return None
        if not self._reused:  # the call's first attend: do every block's gathers fit at once?
            per_position = 2 * self.num_kv_heads * self.head_dim * self.keys.shape[0]  # elements, every block
            numel = sum(slots.shape[0] * length for length, _, slots in groups) * per_position
            if numel * itemsize > self.workspace_bytes:
                self._reused = False
                return None
            self.space.reset(numel)
        return self._reused

    def attend_flex(self, block: int, q: torch.Tensor) -> torch.Tensor:
        args = (q, self.state.slots(q.shape[0]), self.keys[block], self.values[block], self.valid)
        if torch.compiler.is_compiling():
            # Never grown here: a trace would record the allocations, and the graph (which vLLM never
            # re-guards) would make new buffers at every forward while captured CUDA graphs read the freed
            # old ones. The engine's table reserved them when it was built.
            return attend_slots_flex_op(*args, self.flex.handle)
        self.flex.reserve(self.state.buffers.slot.shape[0])  # the engine's buffer: max batched tokens
        return self.flex(*args)

    def chunk_tokens(self, length: int, itemsize: int) -> int:
        """Tokens per gather so that one chunk's keys + values fit in `workspace_bytes`."""
        per_token = 2 * self.num_kv_heads * length * self.head_dim * itemsize
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
            self.keys[b, slot, :, :n] = k.transpose(0, 1)  # [Lc, nKV, D] -> [nKV, Lc, D]
            self.values[b, slot, :, :n] = v.transpose(0, 1)
        self.valid[slot].zero_()
        self.valid[slot, : (n or 1)] = True
        self.bucket_len[slot] = min(self.max_len, -(-(n or 1) // LENGTH_BUCKET) * LENGTH_BUCKET)
