"""Every quirk of the FLAS math contract (docs/flas-spec.md, sections 2-5) against an
independent reference written here in plain torch, straight from the spec.

Each test compares the library (flas_vllm.core.flow, flas_vllm.reference.hf, flas_vllm.core.concept) with
the reference and, where it helps, shows that the "natural but wrong" variant of the
quirk gives a different answer, so the test fails if the quirk is dropped.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flas_vllm.core.config import FlasConfig, FlowGeometry
from flas_vllm.fixtures.checkpoints import randomize_flow
from flas_vllm.core.flow import (
    FlowFunction,
    SingleConceptKV,
    TimeEmbedding,
    apply_rope,
    cross_attend,
    dense_causal_attention,
    euler_dt,
    integrate,
    rope_cos_sin,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------
# small geometry (query_pre_attn_scalar != head_dim, GQA, a softcap small enough to bite)


def small_geometry(*, bias: bool = False, cap: float | None = 8.0) -> FlowGeometry:
    return FlowGeometry(
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_hidden_layers=4,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_pre_attn_scalar=12.0,
        attn_logit_softcapping=cap,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=bias,
    )


def random_flow(g: FlowGeometry, *, num_blocks: int = 1, seed: int = 0, dtype=torch.float32, **cfg_kw) -> FlowFunction:
    cfg = FlasConfig(layer=2, num_blocks=num_blocks, **cfg_kw)
    flow = randomize_flow(FlowFunction(g, cfg), seed, norm_std=0.5, bias_std=0.1)
    return flow.to(dtype).eval()


def full_causal_core(g: FlowGeometry, scale: float):
    """A stateless self-attention core for a single stream [T, ...] (library attention)."""

    def core(q, k, v):
        t = q.shape[0]
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
        out = dense_causal_attention(
            q.view(1, t, g.num_heads, g.head_dim),
            k.view(1, t, g.num_kv_heads, g.head_dim),
            v.view(1, t, g.num_kv_heads, g.head_dim),
            allowed, scale, g.attn_logit_softcapping,
        )
        return out.reshape(t, -1)

    return core


# ---------------------------------------------------------------------------
# the reference, from the spec (loops over heads, no library code)


def r_norm(x, w, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
    return y.to(x.dtype)


def r_linear(x, P, name):
    return F.linear(x, P[name + ".weight"], P.get(name + ".bias"))


def r_rope(x, pos, theta, dtype, freq_dtype=None):
    """x [T, heads, D]; rotate-half; tables in fp32, cast to `dtype`.

    The flow's inverse frequencies are rounded to the flow dtype first (spec 2);
    pass freq_dtype=torch.float32 for the base model's own RoPE (never rounded).
    """
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    inv = inv.to(dtype if freq_dtype is None else freq_dtype).to(torch.float32)
    ang = pos.to(torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def r_time_embed(t, P):
    freqs = torch.exp(-math.log(10000.0) * torch.arange(64, dtype=torch.float32) / 64)
    tt = torch.as_tensor(t).to(torch.float32)
    e = torch.cat([torch.sin(tt * freqs), torch.cos(tt * freqs)]).to(P["time_embed.mlp.0.weight"].dtype)
    x = F.silu(r_linear(e, P, "time_embed.mlp.0"))
    return r_linear(x, P, "time_embed.mlp.2")


def r_attention(q, k, v, *, scale, cap, allowed=None, key_valid=None, mask_after_softcap=True):
    """q [Tq, nH, D], k/v [Tk, nKV, D]; allowed [Tq, Tk] (causal etc.), key_valid [Tk] (-1e4 mask)."""
    nh, nkv = q.shape[1], k.shape[1]
    outs = []
    for head in range(nh):
        kvh = head // (nh // nkv)
        logits = (q[:, head] @ k[:, kvh].t()) * scale
        if key_valid is not None and not mask_after_softcap:
            logits = logits.masked_fill(~key_valid[None], -1e4)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        if key_valid is not None and mask_after_softcap:
            logits = logits.masked_fill(~key_valid[None], -1e4)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        outs.append(probs @ v[:, kvh])
    return torch.stack(outs, dim=1)  # [Tq, nH, D]


def r_concept_kv(P, g, i, c, *, concept_pos=None, norm_before_rope=True, fdt=None):
    lc = c.shape[0]
    pos = torch.arange(lc) if concept_pos is None else concept_pos
    pre = f"blocks.{i}.cross_attn."
    k = r_linear(c, P, pre + "k_proj").view(lc, g.num_kv_heads, g.head_dim)
    v = r_linear(c, P, pre + "v_proj").view(lc, g.num_kv_heads, g.head_dim)
    if norm_before_rope:
        k = r_rope(r_norm(k, P[pre + "k_norm.weight"], g.rms_norm_eps), pos, g.rope_theta, c.dtype, fdt)
    else:
        k = r_norm(r_rope(k, pos, g.rope_theta, c.dtype), P[pre + "k_norm.weight"], g.rms_norm_eps)
    return k, v


def r_queries(P, g, i, x, positions, *, norm_before_rope=True, fdt=None):
    pre = f"blocks.{i}.cross_attn."
    q = r_linear(x, P, pre + "q_proj").view(x.shape[0], g.num_heads, g.head_dim)
    if norm_before_rope:
        return r_rope(r_norm(q, P[pre + "q_norm.weight"], g.rms_norm_eps), positions, g.rope_theta, x.dtype, fdt)
    return r_norm(r_rope(q, positions, g.rope_theta, x.dtype), P[pre + "q_norm.weight"], g.rms_norm_eps)


def r_self_attn(P, g, i, x, positions, *, window=None, fdt=None):
    t = x.shape[0]
    pre = f"blocks.{i}.self_attn."
    q = r_rope(r_linear(x, P, pre + "q_proj").view(t, g.num_heads, g.head_dim), positions, g.rope_theta, x.dtype, fdt)
    k = r_rope(r_linear(x, P, pre + "k_proj").view(t, g.num_kv_heads, g.head_dim), positions, g.rope_theta, x.dtype, fdt)
    v = r_linear(x, P, pre + "v_proj").view(t, g.num_kv_heads, g.head_dim)
    ii = torch.arange(t)[:, None]
    jj = torch.arange(t)[None, :]
    allowed = jj <= ii
    if window is not None:
        allowed = allowed & (ii - jj < window)
    out = r_attention(q, k, v, scale=g.query_pre_attn_scalar ** -0.5, cap=g.attn_logit_softcapping, allowed=allowed)
    return r_linear(out.reshape(t, -1), P, pre + "o_proj")


def r_flow(P, g, h, t, positions, c, *, c_valid=None, te_every_block=True, cross_scale=None, concept_pos=None,
           norm_before_rope=True, window=None, mask_after_softcap=True, rope_freq_dtype=None):
    """v(h, t, c) for one stream h [T, H] with the spec's math; keyword args select WRONG variants."""
    nblocks = 1 + max(int(n.split(".")[1]) for n in P if n.startswith("blocks."))
    te = r_time_embed(t, P)
    h_in = h
    eps = g.rms_norm_eps
    for i in range(nblocks):
        b = f"blocks.{i}."
        if te_every_block or i == 0:
            h = h + te
        if b + "cross_gate" in P:
            x = r_norm(h, P[b + "pre_cross_norm.weight"], eps)
            q = r_queries(P, g, i, x, positions, norm_before_rope=norm_before_rope, fdt=rope_freq_dtype)
            k, v = r_concept_kv(P, g, i, c, concept_pos=concept_pos, norm_before_rope=norm_before_rope,
                                fdt=rope_freq_dtype)
            scale = g.head_dim ** -0.5 if cross_scale is None else cross_scale
            out = r_attention(q, k, v, scale=scale, cap=g.attn_logit_softcapping, key_valid=c_valid,
                              mask_after_softcap=mask_after_softcap)
            out = r_linear(out.reshape(h.shape[0], -1), P, b + "cross_attn.o_proj")
            h = h + P[b + "cross_gate"] * r_norm(out, P[b + "post_cross_norm.weight"], eps)
        if b + "self_attn_gate" in P:
            x = r_norm(h, P[b + "pre_sa_norm.weight"], eps)
            out = r_self_attn(P, g, i, x, positions, window=window, fdt=rope_freq_dtype)
            h = h + P[b + "self_attn_gate"] * r_norm(out, P[b + "post_sa_norm.weight"], eps)
        if b + "mlp_gate" in P:
            x = r_norm(h, P[b + "pre_mlp_norm.weight"], eps)
            m = r_linear(F.gelu(r_linear(x, P, b + "gate_proj"), approximate="tanh") * r_linear(x, P, b + "up_proj"),
                         P, b + "down_proj")
            h = h + P[b + "mlp_gate"] * r_norm(m, P[b + "post_mlp_norm.weight"], eps)
    return h - h_in


def r_integrate(P, g, h, flowtime, n_steps, positions, c, **variant):
    dt = torch.tensor(flowtime / n_steps, dtype=torch.float32).to(h.dtype)
    for k in range(n_steps):
        h = h + dt * r_flow(P, g, h, dt * k, positions, c, **variant)
    return h


def lib_flow(flow, h, t, positions, c):
    """The library's FlowFunction.forward on one stream h [T, H] at time t."""
    te = flow.time_embed(torch.as_tensor(t, dtype=flow.dtype))
    ckv = SingleConceptKV(flow.project_concept(c), flow.g.attn_logit_softcapping)
    cores = [full_causal_core(flow.g, flow.self_attn_scale)] * flow.cfg.num_blocks
    return flow(h, te, positions, ckv, cores)


def state(flow):
    return {k: v.detach() for k, v in flow.state_dict().items()}


def inputs(g, *, t=7, lc=5, seed=1, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(t, g.hidden_size, generator=gen)).to(dtype)
    c = torch.randn(lc, g.hidden_size, generator=gen).to(dtype)
    return h, c


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------
# the whole flow against the reference


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_blocks", [1, 2])
@pytest.mark.parametrize("disable", [None, "disable_self_attn", "disable_cross_attn", "disable_mlp"])
def test_flow_forward_matches_reference(bias, num_blocks, disable):
    g = small_geometry(bias=bias)
    flow = random_flow(g, num_blocks=num_blocks, **({disable: True} if disable else {}))
    h, c = inputs(g)
    pos = torch.arange(3, 3 + h.shape[0])
    with torch.no_grad():
        got = lib_flow(flow, h, 0.8, pos, c)
        want = r_flow(state(flow), g, h, 0.8, pos, c)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# (a) dt = T/N in fp32, rounded to the flow dtype; t_k = dt * k in that dtype


def test_euler_dt_rounds_in_the_flow_dtype():
    dt = euler_dt(2.0, 3, torch.bfloat16)
    assert dt.dtype == torch.bfloat16
    assert dt.item() == 0.66796875
    assert [(dt * k).item() for k in range(3)] == [0.0, 0.66796875, 1.3359375]
    dt32 = euler_dt(2.0, 3, torch.float32)
    assert dt32.dtype == torch.float32
    assert dt32.item() == torch.tensor(2.0 / 3.0, dtype=torch.float32).item()
    assert dt32.item() != dt.item()
    # a per-row tensor of flowtimes, T/N computed in fp32 (not fp64) before rounding
    rows = euler_dt(torch.tensor([0.0, 0.5, 2.0]), 3, torch.bfloat16)
    want = (torch.tensor([0.0, 0.5, 2.0], dtype=torch.float32) / 3).to(torch.bfloat16)
    assert torch.equal(rows, want)
    assert rows[0].item() == 0.0


def _bf16_setup():
    g = small_geometry()
    flow = random_flow(g, num_blocks=1, dtype=torch.bfloat16, seed=3)
    h, c = inputs(g, t=6, dtype=torch.bfloat16, seed=4, scale=4.0)
    pos = torch.arange(h.shape[0])
    ckv = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
    return g, flow, h, pos, ckv


def test_integrate_uses_rounded_dt_and_bf16_times():
    g, flow, h, pos, ckv = _bf16_setup()
    n = 3
    dt = euler_dt(2.0, n, torch.bfloat16)
    cores = [[full_causal_core(g, flow.self_attn_scale)] for _ in range(n)]
    seen = []
    handle = flow.time_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            got = integrate(flow, h, dt.expand(h.shape[0]), n, pos, ckv, cores)
    finally:
        handle.remove()
    # the times fed to the embedding are dt*k in bf16
    assert [s.dtype for s in seen] == [torch.bfloat16] * n
    assert [s.unique().tolist() for s in seen] == [[0.0], [0.66796875], [1.3359375]]

    with torch.no_grad():
        # manual loop with the rounded dt: each product and sum rounded to bf16
        manual = h
        for k in range(n):
            te = flow.time_embed(torch.full((h.shape[0],), (dt * k).item(), dtype=torch.bfloat16))
            v = flow(manual, te, pos, ckv, cores[k])
            manual = manual + dt * v
        assert torch.equal(got, manual)

        # wrong: the unrounded dt = 2/3 (fp32 times and fp32 accumulation)
        wrong = h.float()
        dt_f = torch.tensor(2.0 / 3.0)
        for k in range(n):
            te = flow.time_embed(dt_f * k)
            v = flow(wrong.to(torch.bfloat16), te, pos, ckv, cores[k])
            wrong = wrong + dt_f * v.float()
        assert not torch.equal(got, wrong.to(torch.bfloat16))


def test_integrate_times_are_multiplied_in_flow_dtype():
    """t_k = dt * k rounded to bf16, not dt (as fp32) * k: pick a case where they differ."""
    n = 5
    dt = euler_dt(1.9, n, torch.bfloat16)
    bf16_times = [(dt * k).item() for k in range(n)]
    fp32_times = [dt.item() * k for k in range(n)]
    assert bf16_times != fp32_times  # the case discriminates
    g = small_geometry()
    flow = random_flow(g, dtype=torch.bfloat16)
    h, c = inputs(g, t=2, dtype=torch.bfloat16)
    ckv = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
    cores = [[full_causal_core(g, flow.self_attn_scale)] for _ in range(n)]
    seen = []
    handle = flow.time_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].item()))
    try:
        with torch.no_grad():
            integrate(flow, h, dt.expand(2), n, torch.arange(2), ckv, cores)
    finally:
        handle.remove()
    assert seen == bf16_times


def test_one_euler_step_uses_only_t0_whose_embedding_is_not_zero():
    g = small_geometry()
    flow = random_flow(g)
    h, c = inputs(g)
    pos = torch.arange(h.shape[0])
    ckv = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
    core = full_causal_core(g, flow.self_attn_scale)
    with torch.no_grad():
        te0 = flow.time_embed(torch.zeros(h.shape[0]))  # t = 0 for every token, as integrate does
        assert te0.abs().max() > 0
        got = integrate(flow, h, torch.full((h.shape[0],), 1.5), 1, pos, ckv, [[core]])
        want = h + 1.5 * flow(h, te0, pos, ckv, [core])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(got, r_integrate(state(flow), g, h, 1.5, 1, pos, c), atol=1e-5, rtol=1e-5)


def test_zero_flowtime_leaves_h_exactly_unchanged():
    g, flow, h, pos, ckv = _bf16_setup()
    cores = [[full_causal_core(g, flow.self_attn_scale)] for _ in range(3)]
    with torch.no_grad():
        out = integrate(flow, h, euler_dt(0.0, 3, torch.bfloat16).expand(h.shape[0]), 3, pos, ckv, cores)
    assert torch.equal(out, h)


def test_integrate_matches_reference_fp32_multistep():
    g = small_geometry()
    flow = random_flow(g, num_blocks=2, seed=5)
    h, c = inputs(g, t=9, seed=6)
    pos = torch.arange(9)
    n = 3
    ckv = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
    cores = [[full_causal_core(g, flow.self_attn_scale)] * 2 for _ in range(n)]
    with torch.no_grad():
        got = integrate(flow, h, euler_dt(1.7, n, torch.float32).expand(9), n, pos, ckv, cores)
    want = r_integrate(state(flow), g, h, 1.7, n, pos, c)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# (b) time embedding at the start of EVERY block


def test_time_embedding_enters_every_block():
    g = small_geometry()
    flow = random_flow(g, num_blocks=2, seed=7)
    h, c = inputs(g)
    pos = torch.arange(h.shape[0])
    P = state(flow)
    with torch.no_grad():
        got = lib_flow(flow, h, 1.3, pos, c)
    want = r_flow(P, g, h, 1.3, pos, c)
    once = r_flow(P, g, h, 1.3, pos, c, te_every_block=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max_diff(want, once) > 1e-2  # the "added once" variant is clearly different
    assert max_diff(got, once) > 1e-2


def test_time_embedding_formula():
    for dtype in (torch.float32, torch.bfloat16):
        te = TimeEmbedding(48)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in te.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        te = te.to(dtype)
        P = {f"time_embed.{k}": v for k, v in te.state_dict().items()}
        for t in (0.0, 0.5, 0.66796875, 2.0, 3.7):
            with torch.no_grad():
                got = te(torch.tensor(t, dtype=dtype))
            want = r_time_embed(torch.tensor(t, dtype=dtype), P)
            assert got.dtype == dtype
            tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: matmul rounding order only
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # the sinusoid itself: half = 64, sin first, then cos, frequencies exp(-ln(1e4) * i / 64)
    te = TimeEmbedding(8)
    captured = {}
    te.mlp[0].register_forward_pre_hook(lambda m, a: captured.setdefault("e", a[0]))
    with torch.no_grad():
        te(torch.tensor(1.25))
    i = torch.arange(64, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * i / 64)
    want = torch.cat([torch.sin(1.25 * f), torch.cos(1.25 * f)]).float()
    torch.testing.assert_close(captured["e"], want, atol=1e-6, rtol=0)
    assert captured["e"][64].item() == pytest.approx(math.cos(1.25))  # cos(t * 1) starts the second half


# ---------------------------------------------------------------------------
# (c) cross-attention: scale head_dim**-0.5, softcap BEFORE the -1e4 padding mask


def _qkv(seed=0, n=5, lc=6, nh=4, nkv=2, d=8, big=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = big * torch.randn(n, nh, d, generator=gen)
    k = big * torch.randn(lc, nkv, d, generator=gen)
    v = torch.randn(lc, nkv, d, generator=gen)
    return q, k, v


def test_cross_attend_scale_and_softcap():
    q, k, v = _qkv()
    cap = 5.0
    got = cross_attend(q, k, v, None, cap)
    want = r_attention(q, k, v, scale=8 ** -0.5, cap=cap)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # wrong scale (query_pre_attn_scalar = 12) and no softcap are both visibly different
    assert max_diff(got, r_attention(q, k, v, scale=12 ** -0.5, cap=cap)) > 1e-2
    assert max_diff(got, r_attention(q, k, v, scale=8 ** -0.5, cap=None)) > 1e-2
    # cap None: plain attention
    torch.testing.assert_close(cross_attend(q, k, v, None, None), r_attention(q, k, v, scale=8 ** -0.5, cap=None),
                               atol=1e-6, rtol=1e-5)


def test_cross_attend_mask_after_softcap_and_padding_is_invisible():
    q, k, v = _qkv(seed=1)
    cap = 5.0
    gen = torch.Generator().manual_seed(9)
    k_pad = torch.cat([k, 3.0 * torch.randn(3, 2, 8, generator=gen)])
    v_pad = torch.cat([v, 10.0 * torch.randn(3, 2, 8, generator=gen)])
    valid = torch.tensor([True] * 6 + [False] * 3)
    got = cross_attend(q, k_pad, v_pad, valid, cap)
    torch.testing.assert_close(got, cross_attend(q, k, v, None, cap), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        got, r_attention(q, k_pad, v_pad, scale=8 ** -0.5, cap=cap, key_valid=valid), atol=1e-6, rtol=1e-5
    )
    # masking before the softcap would squash -1e4 to -cap: padding leaks in
    before = r_attention(q, k_pad, v_pad, scale=8 ** -0.5, cap=cap, key_valid=valid, mask_after_softcap=False)
    assert max_diff(got, before) > 1e-3


def test_cross_attend_batched_concepts_with_different_lengths():
    """Leading dims batch (token, concept) pairs; each padded row equals its unpadded self."""
    q, k, v = _qkv(seed=2, lc=6)
    q2, k2, v2 = _qkv(seed=3, lc=4)
    kb = torch.stack([k, torch.cat([k2, torch.zeros(2, 2, 8)])])
    vb = torch.stack([v, torch.cat([v2, torch.ones(2, 2, 8)])])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    got = cross_attend(torch.stack([q, q2]), kb, vb, valid, 5.0)
    torch.testing.assert_close(got[0], cross_attend(q, k, v, None, 5.0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], cross_attend(q2, k2, v2, None, 5.0), atol=1e-6, rtol=1e-5)


def test_flow_cross_attention_scale_is_head_dim():
    g = small_geometry()
    flow = random_flow(g, seed=11, disable_self_attn=True, disable_mlp=True)
    h, c = inputs(g, seed=12)
    pos = torch.arange(h.shape[0])
    P = state(flow)
    with torch.no_grad():
        got = lib_flow(flow, h, 0.5, pos, c)
    torch.testing.assert_close(got, r_flow(P, g, h, 0.5, pos, c), atol=1e-5, rtol=1e-5)
    wrong = r_flow(P, g, h, 0.5, pos, c, cross_scale=g.query_pre_attn_scalar ** -0.5)
    assert max_diff(got, wrong) > 1e-3


# ---------------------------------------------------------------------------
# (d) concept key positions 0..Lc-1, whatever the tokens' positions; (e) q/k norm BEFORE RoPE


def test_concept_keys_rope_positions_start_at_zero():
    g = small_geometry()
    flow = random_flow(g, seed=13)
    _, c = inputs(g, lc=9)
    P = state(flow)
    with torch.no_grad():
        k, v = flow.blocks[0].cross_attn.project_concept(c)
    k_ref, v_ref = r_concept_kv(P, g, 0, c)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-5)
    k_shift, _ = r_concept_kv(P, g, 0, c, concept_pos=torch.arange(9) + 5)
    assert max_diff(k, k_shift) > 1e-2
    # the keys of the <bos> (position 0) are not rotated at all
    k0 = r_norm(r_linear(c[:1], P, "blocks.0.cross_attn.k_proj").view(1, 2, 8), P["blocks.0.cross_attn.k_norm.weight"],
                g.rms_norm_eps)
    torch.testing.assert_close(k[:1], k0, atol=1e-6, rtol=1e-5)


def test_concept_positions_do_not_follow_token_positions():
    g = small_geometry()
    flow = random_flow(g, seed=14, disable_self_attn=True)
    h, c = inputs(g, t=4, seed=15)
    P = state(flow)
    pos = torch.arange(100, 104)  # tokens deep into a request
    with torch.no_grad():
        got = lib_flow(flow, h, 1.0, pos, c)
    torch.testing.assert_close(got, r_flow(P, g, h, 1.0, pos, c), atol=1e-5, rtol=1e-5)
    aligned = r_flow(P, g, h, 1.0, pos, c, concept_pos=torch.arange(100, 100 + c.shape[0]))
    assert max_diff(got, aligned) > 1e-3


def test_cross_attention_norms_before_rope():
    g = small_geometry()
    flow = random_flow(g, seed=16)
    h, c = inputs(g, t=6, seed=17)
    P = state(flow)
    pos = torch.arange(20, 26)
    ca = flow.blocks[0].cross_attn
    cos, sin = rope_cos_sin(pos, g.head_dim, g.rope_theta, torch.float32)
    with torch.no_grad():
        q = ca.queries(h, cos, sin)
        k, _ = ca.project_concept(c)
    torch.testing.assert_close(q, r_queries(P, g, 0, h, pos), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k, r_concept_kv(P, g, 0, c)[0], atol=1e-6, rtol=1e-5)
    assert max_diff(q, r_queries(P, g, 0, h, pos, norm_before_rope=False)) > 1e-2
    assert max_diff(k, r_concept_kv(P, g, 0, c, norm_before_rope=False)[0]) > 1e-2
    with torch.no_grad():
        got = lib_flow(flow, h, 0.7, pos, c)
    assert max_diff(got, r_flow(P, g, h, 0.7, pos, c, norm_before_rope=False)) > 1e-3


def test_rope_tables_and_rotation():
    pos = torch.tensor([0, 1, 7, 40])
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rope(x, cos, sin), r_rope(x, pos, 10000.0, torch.float32), atol=1e-6, rtol=1e-6)
    cb, sb = rope_cos_sin(pos, 8, 10000.0, torch.bfloat16)
    assert cb.dtype == sb.dtype == torch.bfloat16
    # bf16 flow: inverse frequencies rounded to bf16, angles in fp32, tables cast to bf16
    inv = (1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)).to(torch.bfloat16).float()
    ang = pos.float()[:, None] * inv
    assert torch.equal(cb, torch.cat([ang, ang], -1).cos().to(torch.bfloat16))
    assert torch.equal(sb, torch.cat([ang, ang], -1).sin().to(torch.bfloat16))
    assert not torch.equal(sb, sin.to(torch.bfloat16))  # the fp32-frequency tables differ


def real_head_geometry() -> FlowGeometry:
    """Gemma-2-9B's head geometry (head_dim 256, query_pre_attn_scalar 224), narrow elsewhere."""
    return FlowGeometry(hidden_size=128, intermediate_size=192, num_heads=2, num_kv_heads=1, head_dim=256,
                        num_hidden_layers=4, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=224.0,
                        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", attention_bias=False)


def test_bf16_flow_rounds_rope_frequencies_at_head_dim_256():
    """Spec 2: a bf16 flow's RoPE uses bf16-rounded inverse frequencies (cross-attention queries,
    concept keys, self-attention). At head_dim 256 and 480+ positions, the steered stream equals
    the reference and is far from the float32-frequency variant."""
    g = real_head_geometry()
    flow = random_flow(g, num_blocks=1, dtype=torch.bfloat16, seed=21)
    t = 496
    h, c = inputs(g, t=t, lc=12, seed=22, dtype=torch.bfloat16, scale=3.0)
    pos = torch.arange(t)
    n = 3
    ckv = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
    cores = [[full_causal_core(g, flow.self_attn_scale)] for _ in range(n)]
    with torch.no_grad():
        got = integrate(flow, h, euler_dt(2.0, n, torch.bfloat16).expand(t), n, pos, ckv, cores)
    P = state(flow)
    want = r_integrate(P, g, h, 2.0, n, pos, c)

    wrong = r_integrate(P, g, h, 2.0, n, pos, c, rope_freq_dtype=torch.float32)
    disp, disp_want, disp_wrong = (got - h).float(), (want - h).float(), (wrong - h).float()

    def rel(a, b, rows):
        return ((a[rows] - b[rows]).norm() / b[rows].norm()).item()

    late = slice(384, t)
    assert rel(disp, disp_want, late) < 0.02
    assert rel(disp_wrong, disp_want, late) > 5 * max(rel(disp, disp_want, late), 1e-3)


# ---------------------------------------------------------------------------
# (f) no sliding window in the flow's self-attention


def test_dense_causal_attention_reaches_beyond_32_tokens():
    t, nh, nkv, d = 48, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, nh, d, generator=gen)
    k = torch.randn(1, t, nkv, d, generator=gen)
    v = torch.zeros(1, t, nkv, d)
    v[0, 0] = 1.0  # only the first token carries a value
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
    out = dense_causal_attention(q, k, v, allowed, 12 ** -0.5, 50.0)
    assert (out[0, 47] > 1e-4).all()  # 47 tokens back: a window of 32 would give exactly 0
    # and the whole thing equals the full-causal reference, not the windowed one
    v = torch.randn(1, t, nkv, d, generator=gen)
    out = dense_causal_attention(q, k, v, allowed, 12 ** -0.5, 50.0)
    ii, jj = torch.arange(t)[:, None], torch.arange(t)[None]
    full = r_attention(q[0], k[0], v[0], scale=12 ** -0.5, cap=50.0, allowed=jj <= ii)
    windowed = r_attention(q[0], k[0], v[0], scale=12 ** -0.5, cap=50.0, allowed=(jj <= ii) & (ii - jj < 32))
    torch.testing.assert_close(out[0], full, atol=1e-6, rtol=1e-5)
    assert max_diff(out[0, 32:], windowed[32:]) > 1e-3


def test_flow_self_attention_has_no_window():
    g = small_geometry()
    flow = random_flow(g, seed=18, disable_cross_attn=True)
    h, c = inputs(g, t=48, seed=19)
    pos = torch.arange(48)
    P = state(flow)
    with torch.no_grad():
        got = lib_flow(flow, h, 1.0, pos, c)
    torch.testing.assert_close(got, r_flow(P, g, h, 1.0, pos, c), atol=1e-5, rtol=1e-5)
    assert max_diff(got[40:], r_flow(P, g, h, 1.0, pos, c, window=32)[40:]) > 1e-3


def test_dense_flow_cache_incremental_equals_full_causal_reference():
    """DenseFlowCache (the HF path's per-(step, block) cache): prefill 40 + 6 decodes, left padding."""
    from flas_vllm.reference.hf import DenseFlowCache, StreamState

    nh, nkv, d = 4, 2, 8
    g = small_geometry()
    scale = g.query_pre_attn_scalar ** -0.5
    lengths = [40, 33]
    width, n_dec = max(lengths), 6
    gen = torch.Generator().manual_seed(21)
    total = width + n_dec
    q = torch.randn(2, total, nh * d, generator=gen) * 2
    k = torch.randn(2, total, nkv * d, generator=gen) * 2
    v = torch.randn(2, total, nkv * d, generator=gen)
    valid = torch.ones(2, total, dtype=torch.bool)
    for r, n in enumerate(lengths):
        valid[r, : width - n] = False
    st = StreamState()
    cache = DenseFlowCache(st, g, scale, use_cache=True)
    outs = []
    st.valid = valid[:, :width]
    outs.append(cache(q[:, :width], k[:, :width], v[:, :width]))
    for s in range(width, total):
        st.valid = valid[:, s:s + 1]
        outs.append(cache(q[:, s:s + 1], k[:, s:s + 1], v[:, s:s + 1]))
    got = torch.cat(outs, dim=1)
    assert cache.k.shape[1] == total  # the cache covers the whole request
    for r, n in enumerate(lengths):
        real = valid[r]
        qq = q[r, real].view(-1, nh, d)
        kk = k[r, real].view(-1, nkv, d)
        vv = v[r, real].view(-1, nkv, d)
        tt = qq.shape[0]
        ii, jj = torch.arange(tt)[:, None], torch.arange(tt)[None]
        want = r_attention(qq, kk, vv, scale=scale, cap=g.attn_logit_softcapping, allowed=jj <= ii)
        torch.testing.assert_close(got[r, real].view(-1, nh, d), want, atol=1e-5, rtol=1e-5)
        windowed = r_attention(qq, kk, vv, scale=scale, cap=g.attn_logit_softcapping,
                               allowed=(jj <= ii) & (ii - jj < 32))
        assert max_diff(got[r, real].view(-1, nh, d)[32:], windowed[32:]) > 1e-3


# ---------------------------------------------------------------------------
# the tiny Gemma-2: concept tokenization, concept encoder, and (f) end to end


CONCEPT = "sailing ships on a stormy ocean"


@pytest.fixture(scope="module")
def steerer(tiny_model, make_ckpt):
    from flas_vllm.reference.hf import HFSteerer

    return HFSteerer.from_pretrained(tiny_model, make_ckpt(num_blocks=2))


@pytest.fixture(scope="module")
def long_text():
    import json
    from importlib import resources

    rows = json.loads(resources.files("flas_vllm.data").joinpath("alpaca_eval.json").read_text())
    return " ".join(r["instruction"] for r in rows[:40])


def test_concept_tokenization(steerer, long_text):
    from flas_vllm.core.concept import tokenize_concept

    tok = steerer.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    short = tokenize_concept(tok, CONCEPT)
    text_ids = tok(CONCEPT, add_special_tokens=False)["input_ids"]
    assert short == [bos] + text_ids
    assert eos not in short
    long_ids = tokenize_concept(tok, long_text)
    all_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(all_ids) > 100
    assert len(long_ids) == 64
    assert long_ids == [bos] + all_ids[:63]  # right truncation, <bos> counts
    assert long_ids[-1] != eos
    assert tokenize_concept(tok, long_text, max_len=10) == [bos] + all_ids[:9]


def test_concept_tokenization_drops_an_appended_eos():
    from flas_vllm.core.concept import tokenize_concept

    class EosTok:
        eos_token_id = 1

        def __call__(self, text, truncation, max_length, add_special_tokens):
            ids = [2] + [10 + i for i in range(len(text.split()))] + [1]
            return {"input_ids": ids[:max_length] if truncation else ids}

    assert tokenize_concept(EosTok(), "a b c") == [2, 10, 11, 12]


def _ref_decoder_layer(layer, h, pos, cfg, window=None, freq_dtype=torch.float32):
    """Gemma-2 decoder layer written out from the module's weights (plain causal unless window)."""
    eps = cfg.rms_norm_eps
    a = layer.self_attn
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    t = h.shape[0]
    x = r_norm(h, layer.input_layernorm.weight, eps)
    q = r_rope((x @ a.q_proj.weight.t()).view(t, nh, d), pos, theta, h.dtype, freq_dtype)
    k = r_rope((x @ a.k_proj.weight.t()).view(t, nkv, d), pos, theta, h.dtype, freq_dtype)
    v = (x @ a.v_proj.weight.t()).view(t, nkv, d)
    ii, jj = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = jj <= ii
    if window is not None:
        allowed = allowed & (ii - jj < window)
    o = r_attention(q, k, v, scale=cfg.query_pre_attn_scalar ** -0.5, cap=cfg.attn_logit_softcapping, allowed=allowed)
    o = o.reshape(t, -1) @ a.o_proj.weight.t()
    h = h + r_norm(o, layer.post_attention_layernorm.weight, eps)
    x = r_norm(h, layer.pre_feedforward_layernorm.weight, eps)
    m = layer.mlp
    y = (F.gelu(x @ m.gate_proj.weight.t(), approximate="tanh") * (x @ m.up_proj.weight.t())) @ m.down_proj.weight.t()
    return h + r_norm(y, layer.post_feedforward_layernorm.weight, eps)


def _ref_encode(steerer, concept, *, final_norm=True, window=None):
    from flas_vllm.core.concept import tokenize_concept

    model = steerer.model
    cfg = model.config
    ids = torch.tensor(tokenize_concept(steerer.tokenizer, concept))
    emb = model.model.embed_tokens.weight
    h = emb[ids] * torch.tensor(cfg.hidden_size ** 0.5, dtype=emb.dtype)
    pos = torch.arange(len(ids))
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            h = _ref_decoder_layer(layer, h, pos, cfg, window=window)
        if final_norm:
            h = r_norm(h, model.model.norm.weight, cfg.rms_norm_eps)
    return h


@pytest.mark.parametrize("which", ["short", "long"])
def test_encode_concept_is_embed_two_layers_final_norm(steerer, long_text, which):
    concept = CONCEPT if which == "short" else long_text
    got = steerer.encode_concept(concept)
    want = _ref_encode(steerer, concept)
    assert got.dtype == steerer.flow.dtype
    assert got.shape == want.shape
    assert got.shape[0] == (64 if which == "long" else len(steerer.tokenizer(CONCEPT)["input_ids"]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert max_diff(got, _ref_encode(steerer, concept, final_norm=False)) > 1e-1  # (h) the final norm matters
    if which == "long":  # layer 0 is a sliding layer in the model, but the encoder is plain causal
        assert max_diff(got, _ref_encode(steerer, concept, window=32)) > 1e-4


def test_hf_steering_matches_reference_flow_beyond_sliding_window(steerer, long_text):
    """The steered residual stream of a >40-token request equals the reference flow (no window),
    both at prefill and at each cached decode step."""
    layer_idx = steerer.cfg.layer
    layers = steerer.model.model.layers
    raw, steered = [], []
    h1 = layers[layer_idx].register_forward_hook(lambda m, a, out: raw.append((out[0] if isinstance(out, tuple) else out).detach().clone()))

    def pre(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        steered.append(x.detach().clone())

    h2 = layers[layer_idx + 1].register_forward_pre_hook(pre, with_kwargs=True)
    prompt = long_text[:300]
    flowtime = 1.5
    try:
        gens = steerer.generate([prompt], CONCEPT, flowtime, max_new_tokens=4, ignore_eos=True)
    finally:
        h1.remove()
        h2.remove()
    n_prompt = len(gens[0].prompt_token_ids)
    assert n_prompt > 40
    raw_all = torch.cat(raw, dim=1)[0]
    got = torch.cat(steered, dim=1)[0]
    assert raw_all.shape[0] == n_prompt + 3  # prefill + 3 decode forwards
    c = steerer.encode_concept(CONCEPT)
    P = state(steerer.flow)
    g = steerer.geometry
    pos = torch.arange(raw_all.shape[0])
    with torch.no_grad():
        want = r_integrate(P, g, raw_all, flowtime, steerer.n_steps, pos, c)
        windowed = r_integrate(P, g, raw_all, flowtime, steerer.n_steps, pos, c, window=32)
    scale = want.abs().max().item()
    assert max_diff(got, want) <= 1e-4 * max(1.0, scale)
    assert max_diff(got[32:], windowed[32:]) > 1e-3
    assert max_diff(got[:32], windowed[:32]) <= 1e-4 * max(1.0, scale)  # same before the window bites


def test_hf_long_prompt_cached_equals_recompute(steerer, long_text):
    prompt = long_text[:260]
    kw = dict(max_new_tokens=8, ignore_eos=True)
    a = steerer.generate([prompt], CONCEPT, 2.0, use_cache=True, **kw)[0]
    b = steerer.generate([prompt], CONCEPT, 2.0, use_cache=False, **kw)[0]
    assert len(a.prompt_token_ids) > 40
    assert a.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


# ---------------------------------------------------------------------------
# checkpoints the original also loads: its own concept encoder, any concept_max_len


def _modules_from(state, prefix):
    """A read-only module tree (attribute access) over a state dict: `.layers[0].self_attn.q_proj.weight`."""
    from types import SimpleNamespace

    root: dict = {}
    for name, t in state.items():
        if not name.startswith(prefix):
            continue
        node = root
        parts = name[len(prefix):].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = t

    def build(d):
        if all(k.isdigit() for k in d):
            return [build(d[k]) for k in sorted(d, key=int)]
        return SimpleNamespace(**{k: build(v) if isinstance(v, dict) else v for k, v in d.items()})

    return build(root)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_own_concept_encoder_from_a_training_checkpoint(tiny_model, make_ckpt, dtype):
    """A .pt with `concept_enc` encodes concepts with ITS weights (embedding x sqrt(H), layers 0-1
    plain causal, final norm), cast to the flow dtype, RoPE frequencies rounded with it (spec 2, 4)."""
    from flas_vllm.core.concept import tokenize_concept
    from flas_vllm.reference.hf import HFSteerer

    ckpt_dir = make_ckpt(fmt="pt", concept_encoder=True, dtype=dtype)
    blob = torch.load(str(next(ckpt_dir.glob("*.pt"))), map_location="cpu", weights_only=True)
    enc = blob["concept_enc"]
    own = HFSteerer.from_pretrained(tiny_model, ckpt_dir)
    base = HFSteerer.from_pretrained(tiny_model, make_ckpt(fmt="pt", dtype=dtype))
    cfg = own.model.config
    ids = torch.tensor(tokenize_concept(own.tokenizer, CONCEPT))
    w = _modules_from(enc, "")
    dt = getattr(torch, dtype)
    h = w.embed_tokens.weight[ids] * torch.tensor(cfg.hidden_size ** 0.5).to(dt)
    pos = torch.arange(len(ids))
    with torch.no_grad():
        for layer in w.layers:
            h = _ref_decoder_layer(layer, h, pos, cfg, freq_dtype=dt)
        want = r_norm(h, w.norm.weight, cfg.rms_norm_eps)
    got = own.encode_concept(CONCEPT)
    assert got.dtype == dt
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert max_diff(got, base.encode_concept(CONCEPT)) > 10 * tol  # not the base model's layers
    a = own.generate([CONCEPT], CONCEPT, 2.0, max_new_tokens=6, ignore_eos=True)[0].token_ids
    b = base.generate([CONCEPT], CONCEPT, 2.0, max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert len(a) == 6 and len(b) == 6


def test_concepts_are_truncated_to_64_tokens_whatever_concept_max_len_says(tiny_model, make_ckpt, long_text,
                                                                           caplog, monkeypatch):
    import logging

    from flas_vllm.core import concept
    from flas_vllm.reference.hf import HFSteerer

    monkeypatch.setattr(concept, "_warned", set())  # warned once per process: an earlier test may have warned

    with caplog.at_level(logging.WARNING, logger="flas_vllm.core.concept"):
        steerer = HFSteerer.from_pretrained(tiny_model, make_ckpt(concept_max_len=8))
    assert steerer.cfg.concept_max_len == 8
    assert "concept_max_len = 8" in caplog.text
    tok = steerer.tokenizer
    want = tok(long_text, truncation=True, max_length=64)["input_ids"]
    assert len(want) == 64
    assert steerer.encode_concept(long_text).shape[0] == 64
