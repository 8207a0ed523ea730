"""The skip path's flow on steered tokens only: the compaction `build_step` plans, the self-attention
wrapper that still shows vLLM's attention every token, and the compacted flow against the full one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flas_vllm.core.flow import dense_causal_attention, euler_dt
from flas_vllm.engine.flow_rows import RowsCore, integrate_rows, rows_cores, steer_in_place
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step, flow_row_bucket
from tests.test_flow_quirks import random_flow
from tests.test_slot_table import G

BUCKET_LEN = np.array([16, 16, 32, 48, 64, 16, 16])  # slot -> bucketed concept length (as SlotTableKV keeps it)


def _steered(slot: int, euler_steps: int = 3, flowtime: float = 1.0) -> RequestRow:
    return RequestRow(True, slot, euler_steps, float(euler_dt(flowtime, euler_steps, torch.float32)))


# requests in batch order and their tokens: 5 unsteered, 3 on slot 2, 4 unsteered, 2 on slot 3, one with none
STEP = [(RequestRow(), 5), (_steered(2, 2, 1.5), 3), (RequestRow(), 4), (_steered(3, 3, 0.7), 2), (_steered(1), 0)]
STEERED_TOKENS = [5, 6, 7, 12, 13]
N_TOKENS = 14


def _build(step=STEP, bucket_len=BUCKET_LEN, max_tokens=32) -> StepState:
    state = StepState.allocate(max_tokens, torch.float32, "cpu")
    return build_step(state, StepRows.of([r for r, _ in step], [n for _, n in step]), bucket_len)


def test_flow_row_bucket():
    assert [flow_row_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17, 32, 33, 100)] == [1, 2, 4, 8, 16, 16, 32, 32, 48, 112]


def test_build_step_compacts_steered_tokens_and_pads_to_the_bucket():
    state = _build()
    assert state.steered_rows == 5 and state.flow_rows == flow_row_bucket(5) == 8
    # steered tokens in token order, then padding repeating the last one
    assert state.rows.tolist() == STEERED_TOKENS + [13] * 3
    assert state.row_slots.tolist() == [2, 2, 2, 3, 3, 3, 3, 3]
    assert state.slots(8).tolist() == state.row_slots.tolist()
    # concept-length groups over the compacted rows (row indices, not token indices)
    groups = {length: (idx.tolist(), slots.tolist()) for length, idx, slots in state.groups}
    assert groups == {32: ([0, 1, 2], [2, 2, 2]), 48: ([3, 4, 5, 6, 7], [3] * 5)}


def test_a_bucketed_engine_plans_the_steered_rows_only_when_the_eager_path_asks():
    """Bucketed FULL graphs replay without the skip path's rows and groups: build_step leaves them to the op."""
    eager = _build()
    state = StepState.allocate(32, torch.float32, "cpu")
    state.plan_rows_lazily()
    build_step(state, StepRows.of([r for r, _ in STEP], [n for _, n in STEP]), BUCKET_LEN)
    assert state.rows is None and state.groups is None and state.pending_plan is not None
    state.plan_steered_rows()
    assert state.pending_plan is None and state.flow_rows == eager.flow_rows == 8
    assert state.rows.tolist() == eager.rows.tolist() and state.row_slots.tolist() == eager.row_slots.tolist()
    assert [(n, i.tolist(), s.tolist()) for n, i, s in state.groups] == \
        [(n, i.tolist(), s.tolist()) for n, i, s in eager.groups]
    state.plan_steered_rows()  # once per step
    build_step(state, StepRows.of([RequestRow()], [4]), BUCKET_LEN)  # a step with nothing steered: nothing pending
    assert state.pending_plan is None


def test_lazily_planned_rows_are_staged_where_the_next_step_does_not_write():
    """The op stages a bucketed engine's rows during the forward pass, after vLLM V1's input-preparation
    event is recorded; the next step waits only on that event. Its staging must leave this step's host
    rows alone (a GPU copy may still be queued to read them): on CPU the copies are done at once, so the
    host memory itself is checked."""
    state = StepState.allocate(32, torch.float32, "cpu")
    state.plan_rows_lazily()
    steps = [STEP, [(_steered(4), 2), (RequestRow(), 6), (_steered(2, 1, 3.0), 3), (RequestRow(), 3)]]
    build_step(state, StepRows.of([r for r, _ in steps[0]], [n for _, n in steps[0]]), BUCKET_LEN)
    state.plan_steered_rows()
    first = state.rows.tolist()
    staged = [i for i, host in enumerate(state.buffers.staging) if host.rows[: len(first)].tolist() == first]
    build_step(state, StepRows.of([r for r, _ in steps[1]], [n for _, n in steps[1]]), BUCKET_LEN)
    state.plan_steered_rows()
    assert state.rows.tolist() == [0, 1, 8, 9, 10, 10, 10, 10] != first  # the second step's rows, staged
    assert any(state.buffers.staging[i].rows[: len(first)].tolist() == first for i in staged)  # the first's kept


def test_compaction_needs_the_skip_path_and_fewer_rows_than_tokens():
    graph = _build(bucket_len=None)  # the graph path: every token, no groups
    assert graph.rows is None and graph.groups is None and graph.flow_rows == N_TOKENS and graph.steered_rows == 5
    assert graph.slots(N_TOKENS).tolist() == graph.buffers.slot[:N_TOKENS].tolist()
    dense = _build([(RequestRow(), 2), (_steered(2), 7), (_steered(4), 3)])  # 10 steered of 12: a bucket of 16
    assert dense.rows is None and dense.flow_rows == 12 and dense.steered_rows == 10
    assert sorted(len(idx) for _, idx, _ in dense.groups) == [2, 3, 7]  # every token (the null slot too)
    none = _build([(RequestRow(), 6), (_steered(2), 0)])
    assert none.rows is None and none.groups is None and none.flow_rows == 0 and not none.any_steered
    single = _build([(RequestRow(), 40), (_steered(4), 1)], max_tokens=64)  # one decode token among a prefill
    assert single.rows.tolist() == [40] and single.flow_rows == 1
    assert [(length, idx, slots.tolist()) for length, idx, slots in single.groups] == [(64, None, [4])]


def _segment_attention(segments, calls):
    """Stands in for vLLM's paged Attention: causal within each request, needs every token of the step."""

    def core(q, k, v):
        calls.append(q.shape[0])
        assert q.shape[0] == segments[-1][1], "the attention metadata covers every token of the step"
        out = torch.empty_like(q)
        for start, end in segments:
            t = end - start
            allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
            out[start:end] = dense_causal_attention(
                q[start:end].view(1, t, G.num_heads, G.head_dim), k[start:end].view(1, t, G.num_kv_heads, G.head_dim),
                v[start:end].view(1, t, G.num_kv_heads, G.head_dim), allowed, 0.25, 50.0).reshape(t, -1)
        return out

    return core


SEGMENTS = [(0, 5), (5, 8), (8, 12), (12, 14)]  # STEP's requests with tokens


def test_rows_core_equals_full_attention_on_its_rows():
    torch.manual_seed(0)
    calls = []
    core = _segment_attention(SEGMENTS, calls)
    q = torch.randn(N_TOKENS, G.num_heads * G.head_dim)
    k, v = torch.randn(2, N_TOKENS, G.num_kv_heads * G.head_dim)
    full = core(q, k, v)  # unsteered tokens carry values here; they are other requests, so they cannot matter
    rows = torch.tensor(STEERED_TOKENS + [13] * 3)
    got = RowsCore(core, rows, 5, N_TOKENS)(q[rows], k[rows], v[rows])
    assert calls == [N_TOKENS, N_TOKENS] and got.shape == (8, q.shape[1])
    assert torch.equal(got[:5], full[STEERED_TOKENS])
    assert torch.equal(got[5:], full[[13] * 3])  # padding rows: the repeated token's result
    assert rows_cores([[core, None]], rows, 5, N_TOKENS)[0][1] is None  # a block without self-attention


def test_a_narrowed_rows_core_passes_the_steered_rows_alone():
    """With the attention metadata narrowed to the steered requests (steered_attention.py) the core gets the
    steered rows as they are, and the padding rows repeat the last one's result."""
    torch.manual_seed(0)
    calls = []
    core = _segment_attention([(0, 3), (3, 5)], calls)  # the steered requests' segments, alone
    q = torch.randn(8, G.num_heads * G.head_dim)
    k, v = torch.randn(2, 8, G.num_kv_heads * G.head_dim)
    rows = torch.tensor(STEERED_TOKENS + [13] * 3)
    got = RowsCore(core, rows, 5, N_TOKENS, narrowed=True)(q, k, v)
    assert calls == [5] and got.shape == (8, q.shape[1])
    want = core(q[:5], k[:5], v[:5])
    assert torch.equal(got[:5], want) and torch.equal(got[5:], want[[4] * 3])


def _model_selects(stream_out: torch.Tensor, hidden, residual, steered):
    """What `FlasSteer.forward` returns without the in-place path: selects over full-size tensors."""
    return torch.where(steered, torch.zeros_like(hidden), hidden), torch.where(steered, stream_out, residual)


@pytest.mark.parametrize("every", [False, True])
def test_steer_in_place_touches_only_the_steered_rows(every):
    """Eager steps: the flow's rows written straight into the layer's outputs equal the model's selects, and
    the flow saw the model's stream on every steered row."""
    step = [(_steered(2), 5), (_steered(3), 2)] if every else STEP
    state = _build(step)
    n = state.n_tokens
    gen = torch.Generator().manual_seed(9)
    hidden, residual = torch.randn(2, n, G.hidden_size, generator=gen)
    flowed = torch.randn(n, G.hidden_size, generator=gen)  # what the flow returns per row
    steered = state.buffers.steered[:n, None]
    seen = {}

    def steer_into(positions, stream, out):
        rows = torch.arange(n) if state.rows is None else state.rows[: state.steered_rows]
        seen["stream"] = stream[rows].clone()
        out.index_copy_(0, rows, flowed[rows])

    want = _model_selects(flowed, hidden, residual, steered)
    stream = hidden + residual
    h, r = hidden.clone(), residual.clone()
    assert steer_in_place(state, steer_into, torch.arange(n), h, r)
    assert torch.equal(h, want[0]) and torch.equal(r, want[1])
    rows = torch.arange(n) if every else torch.tensor(STEERED_TOKENS)
    assert torch.equal(seen["stream"], stream[rows])


def test_steer_in_place_leaves_a_step_without_steering_alone_and_declines_an_unsplit_mixed_step():
    state = _build([(RequestRow(), 4)])
    h, r = torch.randn(2, 4, G.hidden_size)
    h0, r0 = h.clone(), r.clone()
    assert steer_in_place(state, None, torch.arange(4), h, r)  # nothing steered: nothing to do, nothing called
    assert torch.equal(h, h0) and torch.equal(r, r0)
    # 3 of 4 tokens steered: the bucket (4) covers every token, so the flow would run on the unsteered one too
    state = _build([(_steered(2), 3), (RequestRow(), 1)])
    assert state.rows is None and not steer_in_place(state, None, torch.arange(4), h, r)
    assert torch.equal(h, h0) and torch.equal(r, r0)
    # a dummy batch (memory profiling) measures the model's way, the larger peak a mixed step may still take
    state = _build([(_steered(2), 4)])
    state.profiling = True
    assert not steer_in_place(state, None, torch.arange(4), h, r)


@pytest.fixture(scope="module")
def flow_and_table():
    flow = random_flow(G, num_blocks=2, seed=5)
    table = SlotTableKV(G, num_blocks=2, capacity=4, max_len=64, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for slot, length in ((2, 20), (3, 40)):
            table.write(slot, flow.project_concept(torch.randn(length, G.hidden_size, generator=gen)))
    return flow, table


def test_flow_on_steered_rows_equals_the_flow_on_every_token(flow_and_table):
    """The skip path's compacted flow gives each steered token what the flow on every token gives it
    (each request's own Euler steps, dt, slot and causal self-attention)."""
    flow, table = flow_and_table
    stream = torch.randn(N_TOKENS, G.hidden_size, generator=torch.Generator().manual_seed(7))
    positions = torch.cat([torch.arange(end - start) + 3 for start, end in SEGMENTS])
    results = {}
    for compact in (True, False):
        # the reference: the graph path's state (every token, each gathering the full concept length)
        state = table.state = _build(bucket_len=table.bucket_len if compact else None)
        calls = []
        cores = [[_segment_attention(SEGMENTS, calls)] * 2 for _ in range(3)]
        rows = state.rows
        assert (rows is not None) == compact
        with torch.no_grad():
            results[compact] = integrate_rows(flow, table, cores, state, positions, stream, state.max_euler_steps, rows)
        assert calls == [N_TOKENS] * 6  # 3 Euler steps x 2 blocks, each on the whole step
    got, want = results[True][STEERED_TOKENS], results[False][STEERED_TOKENS]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, stream[STEERED_TOKENS], atol=1e-3)  # the flow did move them


def test_a_step_lengthened_by_cuda_graph_padding_runs_its_real_tokens_unchanged(flow_and_table):
    """PIECEWISE CUDA graphs pad the step (here 12 tokens to 16): the op sees a longer stream than the step
    was planned for. Planned groups no longer fit and the table falls back to one full-length gather
    (padded rows: slot 0, no Euler steps); the real tokens get what an unpadded step gives them."""
    flow, table = flow_and_table
    step = [(_steered(2, 2, 1.5), 5), (_steered(2, 3, 0.7), 7)]  # every token steered, one concept length
    segments, n, padded = [(0, 5), (5, 12)], 12, 16
    stream = torch.randn(padded, G.hidden_size, generator=torch.Generator().manual_seed(8))
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.zeros(padded - n, dtype=torch.long)])
    state = table.state = _build(step, bucket_len=table.bucket_len)
    assert state.rows is None and [idx for _, idx, _ in state.groups] == [None]  # planned for 12 rows, unsplit
    with torch.no_grad():
        cores = [[_segment_attention(segments + [(n, padded)], [])] * 2 for _ in range(3)]
        got = integrate_rows(flow, table, cores, state, positions, stream, state.max_euler_steps, None)
        cores = [[_segment_attention(segments, [])] * 2 for _ in range(3)]
        want = integrate_rows(flow, table, cores, state, positions[:n], stream[:n], state.max_euler_steps, None)
    assert got.shape[0] == padded
    torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-5)  # the grouped gather vs the full-length one
    assert torch.equal(got[n:], stream[n:])  # padding: no Euler steps
