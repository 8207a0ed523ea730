"""The engine's flow linears (engine/flow_linears.py): q/k/v and gate/up fused into one GEMM each.

The fused GEMM's columns must equal the separate GEMMs' bit for bit on CPU (the fp32 parity with the
transformers path rests on it), the parameters must keep their names and be views of the fused
weights (a weight loader's copy reaches the fused GEMM), and the fused MLP must not raise the flow's
memory peak.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flas_vllm.core.flow import FlowGeometry, integrate
from flas_vllm.engine.flow_linears import (FusedLinear, PlatformLinear, prepare_engine_linears,
                                           use_engine_linears, use_platform_gemm)
from tests.test_flow_quirks import full_causal_core, random_flow
from tests.test_slot_table import G

G_BIAS = FlowGeometry(**{**G.__dict__, "attention_bias": True})  # q/k/v with biases (as some families have)


class _NoConcept:
    """No concept: cross-attention off in these flows (the fused projections are elsewhere)."""


def _platform_only(flow: nn.Module) -> nn.Module:
    """The engine's previous flow: every linear through vLLM's CPU GEMM, nothing fused."""
    flow = copy.deepcopy(flow)
    use_platform_gemm(flow)
    prepare_engine_linears(flow)
    return flow


def _engine(flow: nn.Module) -> nn.Module:
    flow = copy.deepcopy(flow)
    use_engine_linears(flow, platform_gemm=True)
    prepare_engine_linears(flow)
    return flow


def _run(flow, tokens: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, flow.g.hidden_size, generator=gen).to(flow.dtype)
    dt = torch.full((tokens,), 0.5, dtype=flow.dtype)
    positions = torch.arange(tokens)
    cores = [[full_causal_core(flow.g, flow.self_attn_scale)] for _ in range(2)]
    with torch.inference_mode():
        return integrate(flow, h, dt, 2, positions, _NoConcept(), cores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", [G, G_BIAS], ids=["no-bias", "bias"])
def test_fused_projections_equal_the_separate_gemms_bit_for_bit(geometry, dtype):
    flow = random_flow(geometry, dtype=dtype, disable_cross_attn=True)
    separate, fused = _platform_only(flow), _engine(flow)
    assert isinstance(fused.blocks[0].self_attn.qkv_proj, FusedLinear)
    assert isinstance(fused.blocks[0].gate_up_proj, FusedLinear)
    for tokens in (1, 7, 64):
        a, b = _run(separate, tokens), _run(fused, tokens)
        assert a.abs().max() > 0
        assert torch.equal(a, b), (tokens, (a.float() - b.float()).abs().max())


def test_parameters_keep_their_names_and_are_views_of_the_fused_weights():
    flow = random_flow(G_BIAS, disable_cross_attn=True)
    engine = _engine(flow)
    assert engine.state_dict().keys() == flow.state_dict().keys()  # checkpoint names unchanged, no fused keys
    for name, tensor in flow.state_dict().items():
        assert torch.equal(engine.state_dict()[name], tensor), name
    attn = engine.blocks[0].self_attn
    fused = attn.qkv_proj
    # a weight loader's copy into a parameter reaches the fused GEMM without any re-fusing
    new_v = torch.randn_like(attn.v_proj.weight)
    with torch.no_grad():
        attn.v_proj.weight.copy_(new_v)
    q_rows, k_rows, _ = fused.sizes
    assert torch.equal(fused.weight[q_rows + k_rows:], new_v)
    # and the fused GEMM, once prepared again (as after every load), computes with it
    prepare_engine_linears(engine)
    attn.v_proj.dispatch()  # v alone, through the same platform GEMM, for comparison
    x = torch.randn(5, G.hidden_size)
    with torch.inference_mode():
        assert torch.equal(fused(x)[2], attn.v_proj(x))


def test_a_replaced_parameter_is_bound_again():
    """A reload that swaps a parameter's tensor (not a copy into it): the next prepare copies it in."""
    engine = _engine(random_flow(G, disable_cross_attn=True))
    block = engine.blocks[0]
    fresh = torch.randn_like(block.up_proj.weight)
    block.up_proj.weight.data = fresh.clone()
    prepare_engine_linears(engine)
    assert torch.equal(block.gate_up_proj.weight[G.intermediate_size:], fresh)
    assert block.up_proj.weight.untyped_storage()._cdata == block.gate_up_proj.weight.untyped_storage()._cdata


def test_separate_projections_are_not_prepared_twice():
    """The parts run only inside their fused GEMM: no GEMM (and no oneDNN-packed copy) of their own."""
    engine = _engine(random_flow(G, disable_cross_attn=True))
    parts = [m for m in engine.modules() if isinstance(m, PlatformLinear) and m.fused]
    assert len(parts) == 5  # q, k, v, gate, up
    assert all(p.cpu_linear is None for p in parts)


def test_to_moves_the_fused_weights_and_keeps_the_parts_bound():
    """`.to()` moves parameters and buffers only; the fused tensors follow, and the parts stay their views."""
    engine = _engine(random_flow(G_BIAS, disable_cross_attn=True))
    engine.to(torch.float64)
    attn = engine.blocks[0].self_attn
    fused = attn.qkv_proj
    assert fused.weight.dtype == torch.float64 and fused.bias.dtype == torch.float64
    for part in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert part.weight.dtype == torch.float64
        assert part.weight.untyped_storage()._cdata == fused.weight.untyped_storage()._cdata
        assert part.bias.untyped_storage()._cdata == fused.bias.untyped_storage()._cdata
    assert torch.equal(fused.weight[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
