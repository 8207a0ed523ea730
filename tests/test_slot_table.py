"""The concept slot table's per-token cross-attention: length grouping is exact math and batch invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flas_vllm.core.config import FlowGeometry
from flas_vllm.core.flow import cross_attend
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step

G = FlowGeometry(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                 num_hidden_layers=4, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=16,
                 attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", attention_bias=False)
LENGTHS = {1: 5, 2: 20, 3: 40, 4: 64}  # slot -> concept length: buckets 16, 32, 48, 64


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    t = SlotTableKV(G, num_blocks=2, capacity=6, max_len=64, dtype=torch.float32, device="cpu")
    kv = {}
    for slot, n in LENGTHS.items():
        per_block = [(torch.randn(n, G.num_kv_heads, G.head_dim), torch.randn(n, G.num_kv_heads, G.head_dim))
                     for _ in range(2)]
        t.write(slot, per_block)
        kv[slot] = per_block
    return t, kv


def step_state(slots, max_tokens: int | None = None, bucket_len: np.ndarray | None = None) -> StepState:
    """The engine's step state for these per-token slots (one steered request per token), built as the
    runtime builds it; `bucket_len` given: grouped by concept length, the indices staged by StepBuffers."""
    slots = np.asarray(slots, dtype=np.int64)
    state = StepState.allocate(max_tokens or max(1, len(slots)), torch.float32, "cpu")
    rows = StepRows.of([RequestRow(steered=True, slot=int(s)) for s in slots], np.ones(len(slots), dtype=np.int64))
    return build_step(state, rows, bucket_len)


def _attend(t, slots, q, block=1, grouped=True):
    t.state = step_state(slots, bucket_len=t.bucket_len if grouped else None)
    return t.attend(block, q)


def test_buckets_follow_concept_lengths(table):
    t, _ = table
    assert [int(t.bucket_len[s]) for s in (0, 1, 2, 3, 4)] == [16, 16, 32, 48, 64]
    _attend(t, [1, 2, 2, 3, 0, 4, 1], torch.randn(7, G.num_heads, G.head_dim))
    assert sorted(length for length, _, _ in t.state.groups) == [16, 32, 48, 64]


def test_grouped_equals_each_concept_alone_unpadded(table):
    t, kv = table
    slots = [2, 1, 3, 3, 4, 2, 1, 4, 2]
    q = torch.randn(len(slots), G.num_heads, G.head_dim)
    got = _attend(t, slots, q)
    full = _attend(t, slots, q, grouped=False)
    for i, s in enumerate(slots):
        k, v = kv[s][1]
        want = cross_attend(q[i:i + 1], k, v, None, G.attn_logit_softcapping)[0]  # the transformers path
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full[i], want, atol=1e-5, rtol=1e-5)


def test_each_token_is_bit_identical_alone_and_in_any_batch(table):
    t, _ = table
    slots = [4, 2, 1, 3, 2, 0, 1, 4, 3, 3, 2]
    q = torch.randn(len(slots), G.num_heads, G.head_dim)
    batch = _attend(t, slots, q)
    shuffled = list(reversed(range(len(slots))))
    other = _attend(t, [slots[i] for i in shuffled], q[shuffled])
    for i, s in enumerate(slots):
        alone = _attend(t, [s], q[i:i + 1])
        assert torch.equal(batch[i], alone[0]), f"token {i} (slot {s}) depends on its batch"
        assert torch.equal(other[shuffled.index(i)], batch[i])


@pytest.fixture
def small_workspace(table):
    """A workspace of 3 tokens' full-length keys + values: every multi-token step is chunked."""
    t, _ = table
    saved = t.workspace_bytes
    t.workspace_bytes = 3 * 2 * G.num_kv_heads * t.max_len * G.head_dim * 4
    yield t
    t.workspace_bytes = saved


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "graph-path"])
def test_chunked_gathers_are_bit_identical_to_one_gather(table, small_workspace, grouped):
    t, kv = table
    slots = [4, 2, 1, 3, 2, 0, 1, 4, 3, 3, 2, 4, 4, 1]
    q = torch.randn(len(slots), G.num_heads, G.head_dim)
    assert t.chunk_tokens(t.max_len, 4) == 3
    chunked = _attend(t, slots, q, grouped=grouped)
    t.workspace_bytes = 1 << 40
    whole = _attend(t, slots, q, grouped=grouped)
    assert torch.equal(chunked, whole)
    for i, s in enumerate(slots[:4]):
        k, v = kv[s][1]
        want = cross_attend(q[i:i + 1], k, v, None, G.attn_logit_softcapping)[0]
        torch.testing.assert_close(chunked[i], want, atol=1e-5, rtol=1e-5)


def test_one_compiled_graph_serves_every_token_count_with_chunking(table, small_workspace):
    """Traced with a symbolic token count (as vLLM compiles), the chunk loop must not freeze one count."""
    from torch._dynamo.testing import CompileCounterWithBackend

    t, _ = table
    t.state = step_state([], max_tokens=32)  # the engine's persistent per-token buffers, no length groups
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def graph(q):
        return t.attend(1, q) * 1.0

    compiled = []
    for n in (5, 17, 2):
        t.state.buffers.slot[:n] = torch.arange(n) % 5
        q = torch.randn(n, G.num_heads, G.head_dim)
        assert torch.equal(graph(q), t.attend(1, q) * 1.0), n
        compiled.append(counter.frame_count)
    assert compiled[0] == compiled[-1], "recompiled for another token count"
    assert sum("flas.attend_slots" in gm.code for gm in counter.graphs) == 1


# ---------------------------------------------------------------------------
# one gather per flow call (gathers_reused) and the gather workspace


def _counting_gathers(monkeypatch) -> list[int]:
    """Counts the slot table's gathers (each call copies one group's keys and values)."""
    from flas_vllm.engine import slot_table

    calls, real = [], slot_table.gather_slots

    def counted(slots, *args, **kwargs):
        calls.append(slots.shape[0])
        return real(slots, *args, **kwargs)

    monkeypatch.setattr(slot_table, "gather_slots", counted)
    return calls


def _flow_call(t, queries):
    """What one flow call asks of the table: (block, q) per Euler step and block, in order."""
    return [t.attend(block, q) for block, q in queries]


def test_a_flow_call_gathers_each_group_once_and_gets_the_same_bits(table, monkeypatch):
    t, _ = table
    slots = [4, 2, 1, 3, 2, 0, 1, 4, 3, 3, 2]
    t.state = step_state(slots, bucket_len=t.bucket_len)
    gen = torch.Generator().manual_seed(3)
    queries = [(block, torch.randn(len(slots), G.num_heads, G.head_dim, generator=gen))
               for _ in range(3) for block in (0, 1)]  # 3 Euler steps x 2 blocks
    calls = _counting_gathers(monkeypatch)
    each_step = _flow_call(t, queries)
    assert len(calls) == 3 * 2 * len(t.state.groups)
    calls.clear()
    with t.gathers_reused():
        reused = _flow_call(t, queries)
    assert len(calls) == 2 * len(t.state.groups) == 8, "one gather per (block, group), not per Euler step"
    for a, b in zip(reused, each_step):
        assert torch.equal(a, b)
    # the next call (another step: other tokens, other slots) gathers afresh
    t.state = step_state([3, 1, 1], bucket_len=t.bucket_len)
    q = torch.randn(3, G.num_heads, G.head_dim, generator=gen)
    with t.gathers_reused():
        got = t.attend(1, q)
    assert torch.equal(got, t.attend(1, q))


def test_a_flow_call_whose_gathers_do_not_fit_gathers_per_step_in_chunks(table, small_workspace, monkeypatch):
    t, _ = table
    slots = [4, 2, 1, 3, 2, 0, 1, 4, 3, 3, 2, 4, 4, 1]
    t.state = step_state(slots, bucket_len=t.bucket_len)
    gen = torch.Generator().manual_seed(4)
    queries = [(1, torch.randn(len(slots), G.num_heads, G.head_dim, generator=gen)) for _ in range(3)]
    each_step = _flow_call(t, queries)
    calls = _counting_gathers(monkeypatch)
    with t.gathers_reused():
        reused = _flow_call(t, queries)
    assert sum(calls) == 3 * len(slots), "every Euler step gathers again"
    assert len(calls) > 3 * len(t.state.groups), "in chunks"
    for a, b in zip(reused, each_step):
        assert torch.equal(a, b)


def test_cpu_gathers_land_in_one_persistent_workspace(table, small_workspace):
    t, _ = table
    assert t.space.persistent
    slots = [4, 2, 1, 3, 2, 0, 1, 4, 3, 3, 2, 4, 4, 1]
    _attend(t, slots, torch.randn(len(slots), G.num_heads, G.head_dim))  # chunks of <= 3 tokens' keys
    buffer = t.space.buffer
    assert buffer is not None and buffer.numel() * buffer.element_size() <= t.space.nbytes
    with t.gathers_reused():
        _attend(t, slots[:2], torch.randn(2, G.num_heads, G.head_dim))
    _attend(t, slots, torch.randn(len(slots), G.num_heads, G.head_dim))
    assert t.space.buffer is buffer, "reallocated for a call that fits"
    assert t.space.buffer.numel() <= t.space.capacity


def test_the_gather_space_grows_to_the_largest_call_and_no_further():
    from flas_vllm.engine.slot_table import GatherSpace

    space = GatherSpace(1 << 20, torch.float32, "cpu")
    assert space.capacity == 1 << 18 and space.buffer is None
    space.reset(1000)
    first = space.take((10, 10))
    assert space.buffer.numel() == 1000 and first.data_ptr() == space.buffer.data_ptr()
    assert space.take((30, 30)).data_ptr() == space.buffer.data_ptr() + 100 * 4  # carved after the first
    buffer = space.buffer
    space.reset(500)
    assert space.buffer is buffer  # never shrinks
    space.reset(10 ** 7)
    assert space.buffer.numel() == space.capacity  # at most nbytes
    full = space.buffer
    space.reset(10 ** 7)
    assert space.buffer is full, "reallocated at capacity"
    outside = space.take((space.capacity + 1,))  # more than the space: a tensor of its own
    assert outside.numel() == space.capacity + 1 and outside.data_ptr() != space.buffer.data_ptr()
    assert not GatherSpace(1 << 20, torch.float32, "meta").persistent  # GPUs (and meta): fresh tensors


def test_the_gather_space_made_in_inference_mode_serves_outside_it(table):
    """vLLM runs steps in inference mode; tests, benchmarks and the reference path may not."""
    t, _ = table
    from flas_vllm.engine.slot_table import GatherSpace

    t.space = GatherSpace(t.workspace_bytes, torch.float32, "cpu")
    q = torch.randn(3, G.num_heads, G.head_dim)
    with torch.inference_mode():
        inside = _attend(t, [1, 2, 3], q)
    with torch.no_grad():
        assert torch.equal(_attend(t, [1, 2, 3], q), inside)


def test_kept_gathers_are_never_read_for_other_rows(table):
    """Inside one flow call the step's rows may not change; rows of another count fail loudly."""
    t, _ = table
    t.state = step_state([1, 1, 2], bucket_len=t.bucket_len)
    with t.gathers_reused():
        t.attend(1, torch.randn(3, G.num_heads, G.head_dim))
        t.state = step_state([1, 2, 2, 2], bucket_len=t.bucket_len)
        with pytest.raises(RuntimeError, match="concept gathers kept for other rows"):
            t.attend(1, torch.randn(4, G.num_heads, G.head_dim))
