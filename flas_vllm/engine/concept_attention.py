"""Concept cross-attention without a per-token gather: FlexAttention over the slot table (GPUs).

`attend_slots` (slot_table.py) copies each token's concept keys and values out of the
table and attends over the copy: exact and batch invariant, and the reference on CPU
and in every parity test, but at 8192 tokens on a GPU the copy alone moves GiBs.
Here the table is read in place instead.

Layout. The table holds per block [slot, KV head, position, D]. Viewed flat it is one key
sequence of (slot, KV head, position) rows, a zero-copy view: FlexAttention gets B=1, H=1,
KV = slots * KV heads * Lc. Each (token, query head) row attends to the Lc keys of its own
(slot, KV head) group (query head h reads KV head h // (nH / nKV)), so the query rows are
sorted by group key `slot * KV heads + KV head` (a device-side stable sort: no host sync, fine
under CUDA graphs) and the block mask lists, per 128-row query block, exactly the
128-key blocks that hold the groups of its rows, trimmed to each concept's valid length.
`mask_mod` keeps a row to its own group inside those blocks; `score_mod` is Gemma-2's
soft-cap, then invalid positions -1e4 after it, as `cross_attend` does; scale
head_dim**-0.5; the kernel's softmax is float32.

The block mask is built from the step's slots into persistent buffers (a scatter and a
sort over [query blocks, key blocks]: microseconds), not with `create_block_mask`, which
evaluates the mask densely (6-9 ms per step on an H200). A row's result depends only on
its own group's key blocks, visited in ascending order; other groups' blocks in its
query block are fully masked and add exact zeros. The split-KV decoding kernel, whose
reduction order would follow the batch's block lists, is turned off
(FORCE_USE_FLEX_ATTENTION).

CPU note (torch 2.13): FlexAttention compiles on CPU only with static shapes; with
dynamic shapes Inductor's C++ template fails to compile ("'cur_kvSplitSize1' was not
declared in this scope"). The engine uses this path only on CUDA, and only where
`FLAS_VLLM_CONCEPT_ATTENTION=flex` asks for it until it has run on a GPU (`use_flex`); CPU tests
compile it with static shapes.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

BLOCK = 128  # FlexAttention's sparse block size, query and key side
KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}  # never the split-KV decoding kernel


def flex_available() -> bool:
    try:
        # optional: flex attention exists only in newer torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return hasattr(BlockMask, "from_kv_blocks")


# The flex path has not yet run on a GPU (no GPU was lent to the sessions that built it), so until
# it has, GPUs keep the exact gather by default and FLAS_VLLM_CONCEPT_ATTENTION=flex opts in
# (as VLLM_USE_V2_MODEL_RUNNER=1 opts in to Model Runner V2). Flip this after a GPU run.
FLEX_BY_DEFAULT = False
CONCEPT_ATTENTION_ENV = "FLAS_VLLM_CONCEPT_ATTENTION"
CONCEPT_ATTENTION_CHOICES = ("gather", "flex")


def requested_concept_attention() -> str:
    """What the environment asks for: 'gather', 'flex', or the default ('flex' or 'gather')."""
    value = os.environ.get(CONCEPT_ATTENTION_ENV, "").strip().lower()
    if not value:
        return "flex" if FLEX_BY_DEFAULT else "gather"
    if value not in CONCEPT_ATTENTION_CHOICES:
        raise ValueError(f"{CONCEPT_ATTENTION_ENV}={value!r}: expected one of {', '.join(CONCEPT_ATTENTION_CHOICES)}")
    return value


def use_flex(device, requested: str | None = None) -> bool:
    """The flex path where it was asked for and the table lives on a CUDA device; the exact gather elsewhere.
    `requested`: the engine's choice as the front end recorded it for the compile-cache key (a worker's
    environment may differ); None: the environment's."""
    choice = requested or requested_concept_attention()
    return torch.device(device).type == "cuda" and choice == "flex" and flex_available()


_COMPILED: dict[bool, object] = {}


def compiled_flex(dynamic: bool):
    """torch.compile(flex_attention), one per shape mode: uncompiled it materializes every score."""
    if dynamic not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention  # optional: flex attention (see flex_available)

        _COMPILED[dynamic] = torch.compile(flex_attention, dynamic=dynamic, fullgraph=True)
    return _COMPILED[dynamic]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_HANDLES = itertools.count()
_BY_HANDLE: dict[str, "FlexSlotAttention"] = {}  # the latest made under each name (torch-only use)


def flex_by_handle(handle: str) -> "FlexSlotAttention":
    """The FlexSlotAttention a traced graph's op names. In an engine's forward, the engine's own (registered in
    its forward context under its layer's name), so a graph compiled by another engine or process and loaded
    from vLLM's compile cache finds this engine's buffers; elsewhere the latest one made under that name."""
    context = sys.modules.get("vllm.forward_context")  # not imported: no engine forward is running (torch-only use)
    found = None
    if context is not None and context.is_forward_context_available():
        found = context.get_forward_context().no_compile_layers.get(handle)
    return found if found is not None else _BY_HANDLE[handle]


class FlexSlotAttention:
    """Block-sparse concept attention for one slot table: its persistent block-mask buffers and mods.

    keys/values per call: [slots, nKV, Lc, D] (one block of the table, contiguous); valid [slots, Lc],
    a prefix of each row (as `SlotTableKV.write` makes it). `dynamic`: compile for symbolic token
    counts (GPUs); False compiles per shape (CPU, where dynamic shapes do not compile).
    """

    def __init__(self, num_slots: int, num_heads: int, max_len: int, cap: float | None, device,
                 max_tokens: int = BLOCK, dynamic: bool | None = None, num_kv_heads: int | None = None,
                 name: str | None = None):
        self.num_slots, self.num_heads, self.max_len = num_slots, num_heads, max_len
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"FlexSlotAttention: {num_heads} query heads do not share {self.num_kv_heads} KV heads "
                             "evenly")
        self.device = torch.device(device)
        self.dynamic = self.device.type == "cuda" if dynamic is None else dynamic
        self.kv_len = num_slots * self.num_kv_heads * max_len
        self.kv_blocks = _ceil_div(self.kv_len, BLOCK)
        self.span = torch.arange(_ceil_div(max_len, BLOCK) + 1, device=self.device)  # key blocks a group may touch
        # each query head's key head (as repeat_interleave expands them)
        self.heads = torch.arange(num_heads, device=self.device) // (num_heads // self.num_kv_heads)
        # each key position's validity, padded to whole blocks (padding: invalid)
        self.kv_valid = torch.zeros(self.kv_blocks * BLOCK, dtype=torch.bool, device=self.device)
        self.cap = None if cap is None else torch.tensor(float(cap), dtype=torch.float32, device=self.device)
        self.rows = 0
        self._grow(max_tokens * num_heads)
        self.handle = name or f"flas.concept_attention.{next(_HANDLES)}"  # what a traced graph's op names
        _BY_HANDLE[self.handle] = self

    def reserve(self, tokens: int) -> None:
        """Buffers for `tokens` tokens at least. The engine's table reserves its max batched tokens when it is
        built (slot_table.py), before any trace or capture, so no buffer a captured CUDA graph reads is ever
        reallocated."""
        if tokens * self.num_heads > self.rows:
            self._grow(tokens * self.num_heads)

    def _grow(self, rows: int) -> None:
        """Buffers for `rows` query rows (tokens x heads)."""
        q_blocks = _ceil_div(rows, BLOCK)
        dev = self.device
        self.rows = q_blocks * BLOCK
        self.row_key = torch.full((self.rows,), -1, dtype=torch.long, device=dev)  # padding matches no group
        self.row_block = torch.arange(self.rows, device=dev) // BLOCK
        self.hits = torch.zeros(q_blocks, self.kv_blocks, dtype=torch.int32, device=dev)
        self.num_blocks = torch.zeros(1, 1, q_blocks, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(1, 1, q_blocks, self.kv_blocks, dtype=torch.int32, device=dev)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.row_key[q_idx] == kv_idx // self.max_len

    def score_mod(self, score, b, h, q_idx, kv_idx):
        if self.cap is not None:
            score = torch.tanh(score / self.cap) * self.cap
        return torch.where(self.kv_valid[kv_idx], score, -1e4)

    def plan(self, slots: torch.Tensor, valid: torch.Tensor):
        """This call's row order (rows sorted by group) and block mask, in the persistent buffers."""
        from torch.nn.attention.flex_attention import BlockMask  # optional: flex attention (see flex_available)

        nh, nk, lc = self.num_heads, self.num_kv_heads, self.max_len
        n_rows = slots.shape[0] * nh
        self.reserve(slots.shape[0])
        key = (slots[:, None] * nk + self.heads).reshape(-1)
        sorted_key, order = torch.sort(key, stable=True)
        self.row_key[:n_rows].copy_(sorted_key)
        self.row_key[n_rows:].fill_(-1)
        self.kv_valid[: self.kv_len].view(self.num_slots, nk, lc).copy_(valid[:, None, :].expand(-1, nk, -1))
        lengths = valid.sum(-1)  # valid is a prefix of each slot's row
        start = sorted_key * lc
        first = start // BLOCK
        last = (start + lengths.index_select(0, sorted_key // nk) - 1) // BLOCK
        kv_block = torch.minimum(first[:, None] + self.span, last[:, None])
        q_blocks = _ceil_div(n_rows, BLOCK)
        hits = self.hits[:q_blocks]
        hits.zero_()
        q_block = self.row_block[:n_rows, None].expand_as(kv_block)
        hits.index_put_((q_block.reshape(-1), kv_block.reshape(-1)), torch.ones((), dtype=hits.dtype,
                                                                                 device=hits.device))
        self.num_blocks[0, 0, :q_blocks].copy_(hits.sum(-1))
        # listed blocks first, in ascending key order (a stable sort of the hit flags)
        self.indices[0, 0, :q_blocks].copy_(torch.sort(hits, dim=-1, descending=True, stable=True).indices)
        mask = BlockMask.from_kv_blocks(self.num_blocks[:, :, :q_blocks], self.indices[:, :, :q_blocks],
                                        BLOCK_SIZE=BLOCK, mask_mod=self.mask_mod,
                                        seq_lengths=(n_rows, self.kv_len), compute_q_blocks=False)
        return order, mask

    def __call__(self, q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
        """q [n, nH, D]; slots [n] -> [n, nH, D], each token attending to its own slot's keys."""
        n, nh, d = q.shape
        if keys.shape[1] != self.num_kv_heads:
            raise ValueError(f"FlexSlotAttention: keys have {keys.shape[1]} heads, planned for {self.num_kv_heads}")
        if n == 0:
            return torch.empty_like(q)
        order, mask = self.plan(slots, valid)
        rows = q.reshape(n * nh, d).index_select(0, order)
        flex = compiled_flex(self.dynamic)
        res = flex(rows[None, None], keys.reshape(1, 1, self.kv_len, d), values.reshape(1, 1, self.kv_len, d),
                   score_mod=self.score_mod, block_mask=mask, scale=d ** -0.5, kernel_options=KERNEL_OPTIONS)
        out = torch.empty_like(rows)
        out.index_copy_(0, order, res[0, 0])
        return out.view(n, nh, d)


@torch.library.custom_op("flas::attend_slots_flex", mutates_args=())
def attend_slots_flex_op(q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         valid: torch.Tensor, handle: str) -> torch.Tensor:
    """`FlexSlotAttention` as one opaque op inside traced graphs (vLLM's own FlexAttention backend also
    calls a compiled flex_attention from inside an opaque op): its block-mask buffers are its workspace."""
    return flex_by_handle(handle)(q, slots, keys, values, valid)


@attend_slots_flex_op.register_fake
def _(q, slots, keys, values, valid, handle):
    return torch.empty_like(q)
