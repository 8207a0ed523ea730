"""The flow's time embeddings from the engine's table (engine/time_table.py), computed once per step size:
the same bits as computing them per token, each request holding its step size's row while in flight."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flas_vllm.core.eager_numerics import rounded
from flas_vllm.core.flow import TimeEmbedding, euler_dt
from flas_vllm.engine.flow_rows import integrate_rows
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step
from flas_vllm.engine.time_table import TimeTable
from tests.test_flow_rows import BUCKET_LEN, N_TOKENS, SEGMENTS, STEP, STEERED_TOKENS, _segment_attention
from tests.test_flow_rows import flow_and_table  # noqa: F401 - the fixture


def _embedder(hidden: int, dtype: torch.dtype, seed: int = 3):
    torch.manual_seed(seed)
    te = TimeEmbedding(hidden)
    with torch.no_grad():
        for p in te.parameters():
            p.normal_(std=0.05)
    return SimpleNamespace(time_embed=te.to(dtype).eval())


def test_rows_are_shared_by_step_size_held_while_in_flight_and_reused():
    flow = _embedder(32, torch.float32)
    table = TimeTable(capacity=2, max_n_steps=4, hidden=32, dtype=torch.float32, device="cpu")
    a = table.acquire(0.25, flow)
    assert table.acquire(0.25, flow) == a and table.rows_in_use() == 1  # one row per step size
    b = table.acquire(0.5, flow)
    assert {a, b} == {1, 2}  # row 0 stays the null row
    assert torch.equal(table.embeddings[0], torch.zeros(4, 32))
    with pytest.raises(RuntimeError, match="more than 2 step sizes in flight"):
        table.acquire(0.75, flow)
    table.release(a)
    assert table.rows_in_use() == 2  # 0.25 still held once
    table.release(a)
    assert table.rows_in_use() == 1
    assert table.acquire(0.75, flow) == a  # the freed row, refilled for its new step size
    want = flow.time_embed(rounded(torch.tensor(0.75) * torch.arange(4)))
    assert torch.equal(table.embeddings[a], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_embeddings_equal_the_per_token_computation(dtype):
    """At Gemma-2-2B's width: each token's row at Euler step k is time_embed(dt * k) as `integrate` computes it
    per token without a table, to the GEMMs' rounding: a CPU GEMM's last bits depend on its row count (here
    below 16 rows against 37), which per token made a request's embedding depend on the batch; from the table
    they are the same in every batch."""
    hidden, steps = 2304, 4
    flow = _embedder(hidden, dtype)
    table = TimeTable(capacity=8, max_n_steps=steps, hidden=hidden, dtype=dtype, device="cpu")
    sizes = [float(euler_dt(t, n, dtype)) for t, n in ((1.0, 3), (2.0, 3), (0.7, 2), (4.0, 4))]
    rows = [table.acquire(dt, flow) for dt in sizes]
    pick = np.random.default_rng(0).integers(0, len(sizes), 37)
    dt_tokens = torch.tensor([sizes[i] for i in pick], dtype=dtype)
    row_tokens = torch.tensor([rows[i] for i in pick])
    with torch.inference_mode():
        for k in range(steps):
            want = flow.time_embed(rounded(dt_tokens * k))
            got = table.at(row_tokens, k)
            torch.testing.assert_close(got, want, msg=f"Euler step {k}")
            assert torch.equal(got, table.embeddings[row_tokens, k])  # one row per step size, whatever the batch
            assert table.at(row_tokens.view(1, -1), k).shape == (1, 37, hidden)


def _rows_with_times(table: TimeTable, flow) -> list[tuple[RequestRow, int]]:
    """test_flow_rows's STEP, each steered request holding its step size's row."""
    return [(row if not row.steered else RequestRow(row.steered, row.slot, row.euler_steps, row.dt,
                                                    table.acquire(row.dt, flow)), n) for row, n in STEP]


@pytest.mark.parametrize("compact", [True, False], ids=["steered rows", "every token"])
def test_the_flow_with_the_table_equals_the_flow_computing_them_per_token(flow_and_table, compact):  # noqa: F811
    flow, concepts = flow_and_table
    stream = torch.randn(N_TOKENS, flow.g.hidden_size, generator=torch.Generator().manual_seed(9))
    positions = torch.cat([torch.arange(end - start) + 3 for start, end in SEGMENTS])
    table = TimeTable(capacity=4, max_n_steps=3, hidden=flow.g.hidden_size, dtype=torch.float32, device="cpu")
    step = _rows_with_times(table, flow)
    results = {}
    for times in (table, None):
        state = concepts.state = StepState.allocate(32, torch.float32, "cpu")
        state.times = times
        build_step(state, StepRows.of([r for r, _ in step], [n for _, n in step]), BUCKET_LEN if compact else None)
        cores = [[_segment_attention(SEGMENTS, [])] * 2 for _ in range(3)]
        with torch.no_grad():
            results[times is None] = integrate_rows(flow, concepts, cores, state, positions, stream,
                                                    state.max_euler_steps, state.rows)
    got, want = results[False][STEERED_TOKENS], results[True][STEERED_TOKENS]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the embeddings' GEMM rounding, carried
    assert not torch.allclose(want, stream[STEERED_TOKENS], atol=1e-3)  # the flow did move them


def test_the_table_embeds_the_same_times_as_integrate_beyond_256_euler_steps():
    """t_k = dt * k as integrate computes it (a flow-dtype dt times a Python int k: one float32 product, one
    rounding), for every k: bf16 holds integers exactly only up to 256, so k itself must not be rounded."""
    times_of = SimpleNamespace(time_embed=lambda t: t[:, None].repeat(1, 2))  # the embedding's input, kept
    table = TimeTable(capacity=1, max_n_steps=300, hidden=2, dtype=torch.bfloat16, device="cpu")
    dt = euler_dt(0.9, 3, torch.bfloat16)  # 0.30078125 in bf16
    row = table.acquire(float(dt), times_of)
    want = torch.stack([rounded(dt.reshape(1) * k)[0] for k in range(300)])
    assert torch.equal(table.embeddings[row, :, 0], want)
