"""FlexAttention over the slot table (the GPU's concept attention) against the exact gather, on CPU.

FlexAttention compiles on CPU with static shapes (concept_attention.py says why not dynamic),
so every call here runs the fused kernel, block mask included, as the GPU would.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flas_vllm.core.config import FlowGeometry
from flas_vllm.engine.concept_attention import (BLOCK, CONCEPT_ATTENTION_ENV, FlexSlotAttention, flex_available,
                                                use_flex)
from flas_vllm.engine.slot_table import SlotTableKV, attend_slots
from tests.test_slot_table import step_state

CAP = 50.0


def _geometry(num_heads: int, head_dim: int) -> FlowGeometry:
    return FlowGeometry(hidden_size=64, intermediate_size=128, num_heads=num_heads, num_kv_heads=num_heads // 2,
                        head_dim=head_dim, num_hidden_layers=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                        query_pre_attn_scalar=head_dim, attn_logit_softcapping=CAP,
                        hidden_activation="gelu_pytorch_tanh", attention_bias=False)


def _table(num_heads, head_dim, lengths, dtype, max_len=64, capacity=6, num_blocks=2):
    """A slot table with random concepts of `lengths` (slot -> keys), written as the engine writes them."""
    g = _geometry(num_heads, head_dim)
    gen = torch.Generator().manual_seed(0)
    t = SlotTableKV(g, num_blocks, capacity, max_len, dtype, "cpu")
    for slot, n in lengths.items():
        t.write(slot, [(torch.randn(n, g.num_kv_heads, head_dim, generator=gen).to(dtype),
                        torch.randn(n, g.num_kv_heads, head_dim, generator=gen).to(dtype))
                       for _ in range(num_blocks)])
    return t


def _flex(t: SlotTableKV) -> FlexSlotAttention:
    return FlexSlotAttention(t.valid.shape[0], t.num_heads, t.max_len, t.cap, "cpu", dynamic=False,
                             num_kv_heads=t.num_kv_heads)


def _queries(n, t, dtype, seed=1):
    return torch.randn(n, t.num_heads, t.head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _exact(t, block, q, slots):
    return attend_slots(q, slots, t.keys[block], t.values[block], t.valid, t.cap, chunk=1 << 20)


SMALL = {1: 5, 2: 20, 3: 40, 4: 64, 6: 1}  # slot -> concept length; slot 5 never written


def test_flex_only_on_cuda_and_only_when_asked_for(monkeypatch):
    assert flex_available()
    monkeypatch.delenv(CONCEPT_ATTENTION_ENV, raising=False)
    assert not use_flex("cuda")  # not yet run on a GPU: the exact gather stays the default
    monkeypatch.setenv(CONCEPT_ATTENTION_ENV, "flex")
    assert use_flex("cuda") and use_flex(torch.device("cuda", 1))
    assert not use_flex("cpu") and not use_flex("meta")
    assert _table(4, 16, {1: 3}, torch.float32).flex is None  # CPU tables keep the exact gather
    monkeypatch.setenv(CONCEPT_ATTENTION_ENV, "gather")
    assert not use_flex("cuda")
    assert use_flex("cuda", requested="flex")  # the engine's recorded choice wins over the worker's environment
    monkeypatch.setenv(CONCEPT_ATTENTION_ENV, "flex")
    assert not use_flex("cuda", requested="gather")
    monkeypatch.setenv(CONCEPT_ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="FLAS_VLLM_CONCEPT_ATTENTION='fast': expected one of gather, flex"):
        use_flex("cuda")


@pytest.mark.parametrize("max_len", [64, 200, 24])  # groups within one key block, across up to 3, unaligned
def test_block_mask_lists_exactly_the_blocks_of_each_query_blocks_groups(max_len):
    """Independent of the kernel: per 128-row query block, the key blocks holding its rows' valid keys."""
    lengths = {s: min(n * max_len // 64, max_len) or 1 for s, n in SMALL.items()}
    t = _table(4, 16, lengths, torch.float32, max_len=max_len)
    flex = _flex(t)
    rng = np.random.default_rng(3)
    slots = torch.from_numpy(rng.choice([0, 1, 2, 3, 4, 6], size=77))
    order, mask = flex.plan(slots, t.valid)
    nh, nk, lc = t.num_heads, t.num_kv_heads, t.max_len
    assert nk < nh  # query heads share key heads (GQA)
    keys = (slots[:, None] * nk + torch.arange(nh) // (nh // nk)).reshape(-1)[order]
    assert torch.equal(keys, torch.sort(keys).values)  # rows grouped by (slot, KV head)
    lengths = t.valid.sum(-1)
    q_blocks = -(-len(keys) // BLOCK)
    want = torch.zeros(q_blocks, flex.kv_blocks, dtype=torch.bool)
    for r, k in enumerate(keys.tolist()):
        for pos in range(int(lengths[k // nk])):
            want[r // BLOCK, (k * lc + pos) // BLOCK] = True
    num = mask.kv_num_blocks[0, 0]
    got = torch.zeros_like(want)
    for qb in range(q_blocks):
        listed = mask.kv_indices[0, 0, qb, : int(num[qb])]
        assert torch.equal(listed, torch.sort(listed).values)  # visited in ascending key order
        got[qb, listed.long()] = True
    assert torch.equal(got, want)
    assert mask.seq_lengths == (len(keys), flex.kv_len)


@pytest.mark.parametrize("max_len", [64, 24])  # 24: the key sequence is not whole 128-key blocks
def test_fp32_equals_the_exact_gather_with_scrambled_slots(max_len):
    t = _table(4, 16, {s: min(n, max_len) for s, n in SMALL.items()}, torch.float32, max_len=max_len)
    flex = _flex(t)
    slots = torch.tensor([3, 0, 2, 6, 4, 1, 2, 4, 3, 1, 6])
    q = _queries(len(slots), t, torch.float32)
    for block in (0, 1):
        got = flex(q, slots, t.keys[block], t.values[block], t.valid)
        torch.testing.assert_close(got, _exact(t, block, q, slots), atol=2e-6, rtol=2e-6)


def test_a_token_alone_equals_the_same_token_in_a_batch():
    t = _table(4, 16, SMALL, torch.float32)
    flex = _flex(t)
    slots = torch.tensor([4, 2, 1, 3, 2, 0, 1, 4, 3, 6, 2])
    q = _queries(len(slots), t, torch.float32, seed=2)
    batch = flex(q, slots, t.keys[1], t.values[1], t.valid)
    flipped = torch.flip(torch.arange(len(slots)), [0])
    other = flex(q[flipped], slots[flipped], t.keys[1], t.values[1], t.valid)
    torch.testing.assert_close(other[flipped], batch, atol=0, rtol=0)
    for i in range(len(slots)):
        alone = flex(q[i:i + 1], slots[i:i + 1], t.keys[1], t.values[1], t.valid)
        assert torch.equal(alone[0], batch[i]), i  # bit-identical on CPU; on a GPU, up to the kernel


HD256 = {1: 7, 2: 64, 3: 33}


def test_head_dim_256_fp32_and_bf16():
    """Gemma-2's head_dim. bf16: flex keeps logits and probabilities in float32 where the gather path
    rounds them to bf16, so both are held to the fp32 result; flex within 2e-2 absolute."""
    slots = torch.tensor([2, 3, 1, 0, 3, 2, 2, 1, 3, 1, 2, 3])
    t32 = _table(8, 256, HD256, torch.float32)
    q32 = _queries(len(slots), t32, torch.float32)
    want = _exact(t32, 0, q32, slots)
    got32 = _flex(t32)(q32, slots, t32.keys[0], t32.values[0], t32.valid)
    torch.testing.assert_close(got32, want, atol=2e-6, rtol=2e-6)

    t16 = _table(8, 256, HD256, torch.bfloat16)
    q16 = q32.to(torch.bfloat16)
    got16 = _flex(t16)(q16, slots, t16.keys[0], t16.values[0], t16.valid)
    gather16 = _exact(t16, 0, q16, slots)
    flex_err = (got16.float() - want).abs().max().item()
    gather_err = (gather16.float() - want).abs().max().item()
    assert flex_err < 2e-2, (flex_err, gather_err)
    assert (got16.float() - gather16.float()).abs().max().item() < 2e-2 + gather_err


def test_slot_table_attend_runs_flex_when_the_table_has_it():
    """The engine's entry point (SlotTableKV.attend) on the flex path, here switched on by hand:
    on a CUDA table the constructor does this. The step state's length groups are not used by it."""
    t = _table(4, 16, SMALL, torch.float32)
    slots_np = np.array([3, 0, 2, 6, 4, 1, 2, 4, 3, 1, 6])
    slots = torch.from_numpy(slots_np)
    q = _queries(len(slots_np), t, torch.float32)
    t.state = step_state(slots_np, max_tokens=len(slots_np) + 5, bucket_len=t.bucket_len)  # the engine's is longer
    exact = t.attend(1, q)
    t.flex = _flex(t)
    got = t.attend(1, q)
    torch.testing.assert_close(got, exact, atol=2e-6, rtol=2e-6)
    calls = []
    real = t.flex.plan
    t.flex.plan = lambda *a: calls.append(1) or real(*a)
    t.attend(0, q)
    assert calls == [1]


def test_no_tokens():
    t = _table(4, 16, SMALL, torch.float32)
    out = _flex(t)(torch.zeros(0, 4, 16), torch.zeros(0, dtype=torch.long), t.keys[0], t.values[0], t.valid)
    assert out.shape == (0, 4, 16)


def test_traced_graphs_call_it_as_one_opaque_op():
    """Inside torch.compile (vLLM compiles the model on GPUs) the flex path is the custom op."""
    t = _table(4, 16, SMALL, torch.float32)
    t.flex = _flex(t)
    slots = torch.tensor([3, 0, 2, 6, 4, 1, 2, 4, 3, 1, 6])
    t.state = step_state(slots.numpy())
    q = _queries(len(slots), t, torch.float32)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    got = torch.compile(lambda x: t.attend(0, x), backend=backend, fullgraph=True)(q)
    assert any("attend_slots_flex" in str(n.target) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(got, _exact(t, 0, q, slots), atol=2e-6, rtol=2e-6)


def test_buffers_are_reserved_once_for_the_engines_token_buffer():
    """A captured CUDA graph keeps reading the block-mask buffers: smaller steps never reallocate them."""
    t = _table(4, 16, SMALL, torch.float32)
    t.flex = _flex(t)
    t.state = step_state([1, 2, 3], max_tokens=300)  # the engine's max batched tokens
    t.attend(0, _queries(3, t, torch.float32))
    assert t.flex.rows == 1280  # 300 tokens x 4 heads, in whole 128-row blocks
    buffers = (t.flex.row_key, t.flex.hits, t.flex.indices)
    t.attend(1, _queries(3, t, torch.float32))
    assert all(a is b for a, b in zip(buffers, (t.flex.row_key, t.flex.hits, t.flex.indices)))


def test_flex_refuses_uneven_head_sharing_and_keys_of_another_head_count():
    with pytest.raises(ValueError, match="4 query heads do not share 3 KV heads evenly"):
        FlexSlotAttention(7, 4, 64, None, "cpu", dynamic=False, num_kv_heads=3)
    t = _table(4, 16, {1: 3}, torch.float32)
    flex = _flex(t)
    expanded = t.keys[0].repeat_interleave(2, dim=1)  # query-head layout: not what the table holds
    with pytest.raises(ValueError, match="keys have 4 heads, planned for 2"):
        flex(_queries(2, t, torch.float32), torch.tensor([1, 1]), expanded, expanded, t.valid)



def test_the_engines_table_reserves_flex_buffers_when_built_and_a_trace_allocates_none(monkeypatch):
    """vLLM traces the graph path once and never re-guards it: buffers grown inside the trace would be made
    anew at every forward, while captured CUDA graphs kept reading the freed ones. The engine's table
    (built with its step state) reserves them up front; the traced graph holds the opaque op alone."""
    from flas_vllm.engine import slot_table

    monkeypatch.setattr(slot_table, "use_flex", lambda device, requested=None: True)  # what a CUDA table does
    slots = np.array([3, 0, 2, 6, 4, 1, 2, 4, 3, 1, 6])
    g = _geometry(4, 16)
    t = SlotTableKV(g, 2, 6, 64, torch.float32, "cpu", state=step_state(slots, max_tokens=300))
    assert t.flex is not None and t.flex.rows == 1280  # 300 tokens x 4 heads, in whole 128-row blocks: at once
    gen = torch.Generator().manual_seed(0)
    for slot, n in SMALL.items():
        t.write(slot, [(torch.randn(n, 2, 16, generator=gen), torch.randn(n, 2, 16, generator=gen))] * 2)
    buffers = (t.flex.row_key, t.flex.hits, t.flex.indices, t.flex.num_blocks)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    q = _queries(len(slots), t, torch.float32)
    compiled = torch.compile(lambda x: t.attend(0, x), backend=backend, fullgraph=True)
    compiled(q)
    got = compiled(q)
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("attend_slots_flex" in c for c in calls)
    assert not any(name in c for c in calls for name in ("full", "zeros", "arange", "empty")), calls
    assert all(a is b for a, b in zip(buffers, (t.flex.row_key, t.flex.hits, t.flex.indices, t.flex.num_blocks)))
    torch.testing.assert_close(got, _exact(t, 0, q, torch.from_numpy(slots)), atol=2e-6, rtol=2e-6)


def test_the_traced_op_finds_its_table_by_name_in_the_engines_forward_context(monkeypatch):
    """A graph from vLLM's compile cache (compiled by another engine, or another process) names the flex
    attention by its layer's name: inside an engine's forward the op takes that engine's, registered in its
    forward context; outside one (torch-only use), the latest made under the name."""
    from vllm.forward_context import ForwardContext, override_forward_context

    from flas_vllm.engine.concept_attention import flex_by_handle

    t = _table(4, 16, SMALL, torch.float32)
    mine, other = (FlexSlotAttention(t.valid.shape[0], 4, t.max_len, t.cap, "cpu", dynamic=False, num_kv_heads=2,
                                     name="model.flas.concept_attention") for _ in range(2))
    assert mine.handle == other.handle == "model.flas.concept_attention"
    assert flex_by_handle(mine.handle) is other  # no forward context: the latest under the name
    called = []
    # which object the op calls (the kernel itself is tested above; not compiled again here)
    monkeypatch.setattr(FlexSlotAttention, "__call__", lambda self, q, *rest: called.append(self) or q.clone())
    context = ForwardContext(no_compile_layers={mine.handle: mine}, attn_metadata={}, slot_mapping={})
    q = _queries(3, t, torch.float32)
    with override_forward_context(context):
        assert flex_by_handle(mine.handle) is mine
        torch.ops.flas.attend_slots_flex(q, torch.tensor([3, 0, 2]), t.keys[0], t.values[0], t.valid, mine.handle)
    torch.ops.flas.attend_slots_flex(q, torch.tensor([3, 0, 2]), t.keys[0], t.values[0], t.valid, mine.handle)
    assert called == [mine, other]  # this engine's inside its forward, the latest outside any
    assert FlexSlotAttention(7, 4, 64, None, "cpu", dynamic=False).handle.startswith("flas.concept_attention.")
