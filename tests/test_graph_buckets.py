"""FULL CUDA graphs keyed by the steered bucket (engine/graph_buckets.py): the ladder, the graph row order in
its persistent buffer, the graph-safe flow on a bucket's rows against the flow on every token, and what a
capture would record (the same kernels for any step with the same key, no host sync)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flas_vllm.engine.flow_rows import integrate_graph_rows, integrate_rows
from flas_vllm.engine.graph_buckets import MIN_BUCKET_ENV, flow_row_buckets, graph_flow_rows, graph_row_order, min_bucket
from flas_vllm.engine.step_buffers import StepBuffers
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step
from tests.test_flow_rows import (N_TOKENS, SEGMENTS, STEERED_TOKENS, STEP, _segment_attention, _steered,
                                  flow_and_table)  # noqa: F401 (a fixture)
from tests.test_slot_table import G


def test_the_ladder_holds_none_all_and_large_fractions():
    assert flow_row_buckets(1) == (0, 1)
    assert flow_row_buckets(64) == (0, 64)  # below 64 rows the graphed flow costs the same: no more graphs
    assert flow_row_buckets(200) == (0, 100, 200)
    assert flow_row_buckets(512) == (0, 64, 128, 256, 512)
    assert flow_row_buckets(513) == (0, 65, 129, 257, 513)
    assert flow_row_buckets(16, smallest=4) == (0, 4, 8, 16)
    assert all(len(flow_row_buckets(n)) <= 5 for n in range(1, 9000, 7))


def test_a_step_replays_the_smallest_bucket_that_holds_its_steered_tokens():
    for n in (1, 7, 64, 100, 512, 8192):
        buckets = flow_row_buckets(n)
        for steered in sorted({0, 1, n // 9, n // 8, n // 8 + 1, n // 3, n // 2, n - 1, n}):
            b = graph_flow_rows(steered, n)
            assert b in buckets and b >= steered
            assert all(c < steered for c in buckets if c < b)
    assert graph_flow_rows(0, 512) == 0 and graph_flow_rows(51, 512) == 64 and graph_flow_rows(300, 512) == 512
    with pytest.raises(ValueError, match="outside 0..8"):
        graph_flow_rows(9, 8)


def test_min_bucket_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(MIN_BUCKET_ENV, "4")
    assert min_bucket() == 4 and flow_row_buckets(16) == (0, 4, 8, 16)
    monkeypatch.setenv(MIN_BUCKET_ENV, "zero")
    with pytest.raises(ValueError, match=f"{MIN_BUCKET_ENV} must be an integer >= 1, got 'zero'"):
        min_bucket()


def test_graph_row_order_puts_steered_tokens_first():
    steered = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    assert graph_row_order(steered).tolist() == [1, 3, 4, 0, 2, 5]


def test_every_prefix_of_the_graph_rows_buffer_is_distinct_rows_across_steps():
    """A FULL graph of N (padded) tokens reads graph_rows[:b] for b <= N: distinct rows whatever earlier,
    longer steps left there, so the flow's scatter back never writes a row twice."""
    buffers = StepBuffers(32, torch.float32, "cpu", {})
    rng = np.random.default_rng(0)
    for n in (20, 5, 31, 0, 12, 3):
        order = graph_row_order(rng.random(n) < 0.4)
        buffers.stage_graph_rows(order)
        rows = buffers.graph_rows.tolist()
        assert sorted(rows) == list(range(32))  # a permutation of every row, padding included
        assert rows[:n] == order.tolist() and rows[n:] == list(range(n, 32))


def _state(step=STEP, max_tokens=32) -> StepState:
    state = StepState.allocate(max_tokens, torch.float32, "cpu")
    state.graph_rows_wanted = True
    return build_step(state, StepRows.of([r for r, _ in step], [n for _, n in step]))


def test_build_step_stages_the_graph_row_order():
    state = _state()
    others = [t for t in range(N_TOKENS) if t not in STEERED_TOKENS]
    assert state.buffers.graph_rows[:N_TOKENS].tolist() == STEERED_TOKENS + others
    plain = StepState.allocate(32, torch.float32, "cpu")  # not bucketed: nothing staged
    build_step(plain, StepRows.of([r for r, _ in STEP], [n for _, n in STEP]))
    assert plain.buffers.graph_rows.tolist() == list(range(32))


def _stream(seed: int, n: int = N_TOKENS) -> torch.Tensor:
    return torch.randn(n, G.hidden_size, generator=torch.Generator().manual_seed(seed))


POSITIONS = torch.cat([torch.arange(end - start) + 3 for start, end in SEGMENTS])
MAX_N_STEPS = 3


def _graph_flow(flow, table, state, stream, n_rows, calls=None):
    cores = [[_segment_attention(SEGMENTS, [] if calls is None else calls)] * 2 for _ in range(MAX_N_STEPS)]
    out = torch.full_like(stream, float("nan"))  # rows the flow does not compute stay NaN
    with torch.no_grad():
        return integrate_graph_rows(flow, table, cores, state, POSITIONS, stream, MAX_N_STEPS, n_rows, out)


@pytest.mark.parametrize("n_rows", [5, 8, N_TOKENS])
def test_the_graph_safe_flow_on_a_bucket_gives_steered_tokens_what_the_full_flow_gives(flow_and_table, n_rows):
    """Each steered token gets what the flow on every token gives it; the bucket's other rows are distinct
    unsteered tokens (computed, then never selected); no other row is computed."""
    flow, table = flow_and_table
    stream = _stream(7)
    state = table.state = _state()
    rows = state.buffers.graph_rows[:n_rows].tolist()
    calls = []
    got = _graph_flow(flow, table, state, stream, n_rows, calls)
    assert calls == [N_TOKENS] * 6  # vLLM's attention still sees the whole step, each Euler step and block
    reference = StepState.allocate(32, torch.float32, "cpu")
    table.state = build_step(reference, StepRows.of([r for r, _ in STEP], [n for _, n in STEP]))  # every token
    cores = [[_segment_attention(SEGMENTS, [])] * 2 for _ in range(MAX_N_STEPS)]
    with torch.no_grad():
        want = integrate_rows(flow, table, cores, reference, POSITIONS, stream, MAX_N_STEPS, None)
    torch.testing.assert_close(got[STEERED_TOKENS], want[STEERED_TOKENS], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[STEERED_TOKENS], stream[STEERED_TOKENS], atol=1e-3)  # the flow moved them
    computed = ~torch.isnan(got).any(dim=1)
    assert computed.nonzero().flatten().tolist() == sorted(rows)
    assert torch.equal(got[rows[5:]], stream[rows[5:]])  # unsteered rows of the bucket: no Euler steps


class _Recorder(TorchDispatchMode):
    """Every aten op a call runs, with its tensors' shapes: what a CUDA-graph capture would record."""

    SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.unique", "aten.masked_select"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shapes = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        self.ops.append((str(func.overloadpacket), shapes))
        return func(*args, **kwargs)


def test_a_capture_records_the_same_kernels_for_any_step_with_the_same_key(flow_and_table):
    """Two steps of 14 tokens replaying the 8-row bucket, with different steered tokens, concepts, flowtimes
    and Euler steps: the graph-safe flow runs the same ops on the same shapes (a captured graph replays the
    first one's), and none of them reads device data back to the host."""
    flow, table = flow_and_table
    other = [(_steered(3, 1, 0.4), 5), (RequestRow(), 3), (_steered(2, 3, 2.0), 3), (RequestRow(), 3)]
    recorded = []
    for step in (STEP, other):
        state = table.state = _state(step)
        assert state.steered_rows <= 8  # both fit the bucket (5 and 8 steered tokens)
        with _Recorder() as rec:
            _graph_flow(flow, table, state, _stream(9), 8)
        recorded.append(rec.ops)
        assert not {op for op, _ in rec.ops} & _Recorder.SYNCS
    assert len(recorded[0]) > 100 and recorded[0] == recorded[1]
