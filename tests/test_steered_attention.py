"""The flow's paged attention narrowed to the steered requests (engine/steered_attention.py), against vLLM's
own CPU attention kernel run over the whole step. The engine tests check the same end to end (mixed = solo,
and the stats count the tokens the flow's attention covered)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm._custom_ops")

from vllm import _custom_ops as ops, envs  # noqa: E402
from vllm.v1.attention.backends import cpu_attn  # noqa: E402

from flas_vllm.engine import steered_attention as sa  # noqa: E402
from flas_vllm.engine.steered_attention import (NARROWERS, SteeredAttention, SteeredRequests,  # noqa: E402
                                                narrow_cpu_metadata, narrower_for)
from flas_vllm.engine.step_buffers import StepBuffers  # noqa: E402
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step, query_start  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 32
# a prefill chunk, a decode over a long context, a decode over a longer one, a short chunk, an unsteered chunk:
# long contexts, so that the backend's schedule splits their KV (VLLM_CPU_ATTN_SPLIT_KV) differently in the
# whole step and in the narrowed one
QUERY_LENS = np.array([3, 1, 1, 2, 9])
SEQ_LENS = np.array([7, 3000, 4100, 33, 12])
STEERED = np.array([0, 2, 3])  # the steered requests
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
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype="auto")
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


def _steered(request_tokens, requests, rows) -> SteeredRequests:
    staged = StepBuffers(64, torch.float32, "cpu").stage_steered_requests(requests,
                                                                        query_start(request_tokens[requests]))
    return SteeredRequests(request_tokens, requests, rows, *staged)


def test_narrowed_attention_gives_the_steered_requests_what_the_whole_step_gives_them(step):
    small = narrow_cpu_metadata(step.meta, step.layer, _steered(QUERY_LENS, STEERED, step.rows))
    assert small is not None and small.num_actual_tokens == len(step.rows) == 6
    assert small.query_start_loc.tolist() == [0, 3, 4, 6]
    assert small.seq_lens.tolist() == SEQ_LENS[STEERED].tolist()
    assert torch.equal(small.block_table, step.meta.block_table[torch.from_numpy(STEERED)])
    assert torch.equal(small.slot_mapping, step.meta.slot_mapping[step.rows])
    whole = _attend(step.query, step.key_cache, step.value_cache, step.meta)
    narrowed = _attend(step.query[step.rows].contiguous(), step.key_cache, step.value_cache, small)
    # Within a reordering of sums, not bit for bit: the backend's schedule splits a context across work items
    # by what else the batch holds and by the thread count (VLLM_CPU_ATTN_SPLIT_KV), which moves last bits at
    # long contexts; vLLM's kernel does the same between a request run alone and the whole step.
    torch.testing.assert_close(narrowed, whole[step.rows], rtol=0, atol=1e-6)
    starts = np.concatenate([[0], np.cumsum(QUERY_LENS)])
    alone = narrow_cpu_metadata(step.meta, step.layer, _steered(QUERY_LENS, np.array([2]), torch.tensor([starts[2]])))
    solo = _attend(step.query[starts[2]: starts[2] + 1].contiguous(), step.key_cache, step.value_cache, alone)
    torch.testing.assert_close(solo, whole[starts[2]: starts[2] + 1], rtol=0, atol=1e-6)


def test_a_step_laid_out_otherwise_keeps_the_whole_step_attention(step):
    """The request layout the step's rows were built from must be the metadata's, else no narrowing."""
    assert narrow_cpu_metadata(step.meta, step.layer, _steered(QUERY_LENS[::-1].copy(), STEERED, step.rows)) is None
    assert narrow_cpu_metadata(step.meta, step.layer, _steered(QUERY_LENS[:4], STEERED, step.rows)) is None


def test_only_known_metadata_classes_are_narrowed(step):
    assert narrower_for(step.meta) is narrow_cpu_metadata
    assert "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata" in NARROWERS
    assert narrower_for(SimpleNamespace()) is None  # any other backend: the whole-step attention


def _state() -> StepState:
    """The engine's step state for the fixture's requests (the steered ones on slot 1)."""
    state = StepState.allocate(64, torch.float32, "cpu")
    rows = [RequestRow(steered=True, slot=1, euler_steps=3, dt=0.5) if r in STEERED else RequestRow()
            for r in range(len(QUERY_LENS))]
    return build_step(state, StepRows.of(rows, QUERY_LENS), np.full(2, 16))


def _context(monkeypatch, names, meta, mapping):
    context = SimpleNamespace(attn_metadata={n: meta for n in names}, slot_mapping={n: mapping for n in names})
    monkeypatch.setattr("vllm.forward_context.get_forward_context", lambda: context)
    return context


def _layers(step, names):
    return [SimpleNamespace(**vars(step.layer), layer_name=n) for n in names]


def test_the_flow_layers_see_narrowed_entries_for_one_flow_call_then_the_steps_own(step, monkeypatch):
    state = _state()
    assert state.rows is not None and state.steered_rows == len(step.rows)
    assert state.rows[: state.steered_rows].tolist() == step.rows.tolist()
    # staged while the step was prepared, with its rows: the narrower only reads them (no copy in the forward)
    index, query_start_loc = state.steered_layout
    assert index.tolist() == STEERED.tolist() and query_start_loc.tolist() == [0, 3, 4, 6]
    names = ["flas_steps.26.attn", "flas_steps.27.attn"]
    context = _context(monkeypatch, names, step.meta, step.meta.slot_mapping)
    base = {"layers.0.attn": object()}  # a base model layer's entry: never touched
    context.attn_metadata.update(base)
    attention = SteeredAttention(_layers(step, names))

    def staged_in_the_forward(*args):  # on a GPU: an event re-recorded after vLLM's, the next step waits on it
        raise AssertionError("the narrower staged the steered requests during the forward")

    monkeypatch.setattr(state.buffers, "stage_steered_requests", staged_in_the_forward)
    with attention.narrowed(state) as narrowed:
        assert narrowed
        small = {id(context.attn_metadata[n]) for n in names}
        assert len(small) == 1 and context.attn_metadata[names[0]].num_actual_tokens == 6  # built once
        assert torch.equal(context.attn_metadata[names[0]].query_start_loc, query_start_loc)
        assert all(torch.equal(context.slot_mapping[n], step.meta.slot_mapping[step.rows]) for n in names)
        assert context.attn_metadata["layers.0.attn"] is base["layers.0.attn"]
    assert all(context.attn_metadata[n] is step.meta and context.slot_mapping[n] is step.meta.slot_mapping
               for n in names)
    with pytest.raises(ValueError), attention.narrowed(state):  # the flow's own error: restored, and raised
        raise ValueError("in the flow")
    assert all(context.attn_metadata[n] is step.meta for n in names)


def test_one_layer_that_cannot_be_narrowed_keeps_every_layer_on_the_whole_step(step, monkeypatch):
    state = _state()
    names = ["flas_steps.26.attn", "flas_steps.27.attn"]
    context = _context(monkeypatch, names, step.meta, step.meta.slot_mapping)
    context.attn_metadata[names[1]] = SimpleNamespace()  # another backend's metadata
    with SteeredAttention(_layers(step, names)).narrowed(state) as narrowed:
        assert not narrowed and context.attn_metadata[names[0]] is step.meta


def test_a_narrower_that_fails_turns_narrowing_off_and_the_step_runs_whole(step, monkeypatch, caplog):
    state = _state()
    names = ["flas_steps.26.attn"]
    context = _context(monkeypatch, names, step.meta, step.meta.slot_mapping)
    key = "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata"

    def broken(*args):
        raise AttributeError("a field vLLM renamed")

    monkeypatch.setitem(NARROWERS, key, broken)
    attention = SteeredAttention(_layers(step, names))
    with caplog.at_level(logging.ERROR, logger=sa.__name__), attention.narrowed(state) as narrowed:
        assert not narrowed and context.attn_metadata[names[0]] is step.meta
    assert not attention.enabled and "narrowing the flow's attention" in caplog.text
    monkeypatch.setitem(NARROWERS, key, narrow_cpu_metadata)
    with attention.narrowed(state) as narrowed:
        assert not narrowed  # off for the rest of the process


def test_a_step_where_every_token_runs_the_flow_is_not_narrowed(step, monkeypatch):
    state = StepState.allocate(64, torch.float32, "cpu")
    build_step(state, StepRows.of([RequestRow(steered=True, slot=1, euler_steps=3, dt=0.5)] * len(QUERY_LENS),
                                  QUERY_LENS), np.full(2, 16))
    assert state.rows is None and state.steered_layout is None
    names = ["flas_steps.26.attn"]
    _context(monkeypatch, names, step.meta, step.meta.slot_mapping)
    with SteeredAttention(_layers(step, names)).narrowed(state) as narrowed:
        assert not narrowed


def test_with_a_kv_connector_the_flow_layers_keep_the_whole_step(step, monkeypatch):
    """A KV connector saves each layer's KV with that layer's metadata: it gets the whole step's."""
    state = _state()
    names = ["flas_steps.26.attn"]
    _context(monkeypatch, names, step.meta, step.meta.slot_mapping)
    monkeypatch.setattr("vllm.distributed.kv_transfer.has_kv_transfer_group", lambda: True)
    with SteeredAttention(_layers(step, names)).narrowed(state) as narrowed:
        assert not narrowed
