"""The flow's paged attention narrowed to the steered requests (engine/steered_attention.py), against vLLM's
own CPU attention kernel run over the whole step. The engine tests check the same end to end (mixed = solo,
and the stats count the tokens the flow's attention covered)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm._custom_ops")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends import cpu_attn  # noqa: E402

from flas_vllm.engine.steered_attention import NARROWERS, narrow_cpu_metadata, narrower_for  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 32
QUERY_LENS = np.array([3, 1, 1, 2])  # a prefill chunk, two decodes, a short chunk
SEQ_LENS = np.array([7, 40, 5, 33])
STEERED = np.array([0, 3])  # the steered requests
SCALE, SOFTCAP = HEAD_DIM ** -0.5, 50.0


def _layer():
    """What the narrower reads of vLLM's Attention layer (the runner's metadata builder sets `isa`)."""
    isa = cpu_attn._get_attn_isa(torch.float32, BLOCK, HEAD_DIM)
    return SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32,
                           isa=isa, impl=SimpleNamespace(kv_cache_dtype="auto"))


def _full_metadata(layer, block_table, slot_mapping):
    query_start_loc = torch.zeros(len(QUERY_LENS) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.from_numpy(np.cumsum(QUERY_LENS)).to(torch.int32)
    seq_lens = torch.from_numpy(SEQ_LENS).to(torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(QUERY_LENS), num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=layer.isa,
        enable_kv_split=True, dynamic_causal=None, kv_cache_dtype="auto")
    return cpu_attn.CPUAttentionMetadata(
        num_actual_tokens=int(QUERY_LENS.sum()), max_query_len=int(QUERY_LENS.max()), query_start_loc=query_start_loc,
        max_seq_len=int(SEQ_LENS.max()), seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
        scheduler_metadata=schedule)


def _attend(query, key_cache, value_cache, meta):
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=SCALE, causal=meta.causal,
        alibi_slopes=None, sliding_window=-1, block_table=meta.block_table, softcap=SOFTCAP,
        scheduler_metadata=meta.scheduler_metadata, s_aux=None)
    return out


@pytest.fixture(scope="module")
def step():
    torch.manual_seed(0)
    blocks_per_req = -(-SEQ_LENS.max() // BLOCK)
    num_blocks = len(SEQ_LENS) * blocks_per_req + 3
    key_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
    value_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    block_table = order[: len(SEQ_LENS) * blocks_per_req].view(len(SEQ_LENS), blocks_per_req).contiguous()
    # each token's cache slot: its position (the last query_len of its sequence) in its request's blocks
    slots = [int(block_table[r, p // BLOCK]) * BLOCK + p % BLOCK
             for r, (q, s) in enumerate(zip(QUERY_LENS, SEQ_LENS)) for p in range(s - q, s)]
    layer = _layer()
    meta = _full_metadata(layer, block_table, torch.tensor(slots, dtype=torch.int64))
    query = torch.randn(int(QUERY_LENS.sum()), HEADS, HEAD_DIM)
    starts = np.concatenate([[0], np.cumsum(QUERY_LENS)])
    rows = torch.from_numpy(np.concatenate([np.arange(starts[r], starts[r + 1]) for r in STEERED]))
    return SimpleNamespace(layer=layer, meta=meta, query=query, rows=rows, key_cache=key_cache,
                           value_cache=value_cache)


def test_narrowed_attention_gives_the_steered_requests_what_the_whole_step_gives_them(step):
    small = narrow_cpu_metadata(step.meta, step.layer, QUERY_LENS, STEERED, step.rows)
    assert small is not None and small.num_actual_tokens == len(step.rows) == 5
    assert small.query_start_loc.tolist() == [0, 3, 5]
    assert small.seq_lens.tolist() == SEQ_LENS[STEERED].tolist()
    assert torch.equal(small.block_table, step.meta.block_table[torch.from_numpy(STEERED)])
    assert torch.equal(small.slot_mapping, step.meta.slot_mapping[step.rows])
    whole = _attend(step.query, step.key_cache, step.value_cache, step.meta)
    narrowed = _attend(step.query[step.rows].contiguous(), step.key_cache, step.value_cache, small)
    assert torch.equal(narrowed, whole[step.rows])


def test_a_step_laid_out_otherwise_keeps_the_whole_step_attention(step):
    """The request layout the step's rows were built from must be the metadata's, else no narrowing."""
    assert narrow_cpu_metadata(step.meta, step.layer, QUERY_LENS[::-1].copy(), STEERED, step.rows) is None
    assert narrow_cpu_metadata(step.meta, step.layer, QUERY_LENS[:3], STEERED, step.rows) is None


def test_only_known_metadata_classes_are_narrowed(step):
    assert narrower_for(step.meta) is narrow_cpu_metadata
    assert "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata" in NARROWERS
    assert narrower_for(SimpleNamespace()) is None  # any other backend: the whole-step attention
