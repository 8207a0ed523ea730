"""The FLAS flow function and its Euler integration: the one implementation of the math.

Every path (the vLLM model, the transformers parity path, checkpoint validation,
random fixtures) builds `FlowFunction` from here. What varies between paths is
plugged in rather than copied:
- the causal self-attention over a request's own stream (`SelfAttentionCore`):
  paged vLLM attention in the engine, a dense cached one in the transformers path;
- where the concept's cross-attention keys/values come from (`ConceptKV`):
  one concept for a whole batch, or a per-token slot table;
- q/k/v and gate/up: separate GEMMs, or the engine's fused ones (`FusedProjection`).

Quirks of the original code that are reproduced on purpose are marked "quirk"
(the project's FLAS spec, sections 2, 3 and 5).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flas_vllm.core.config import FlasConfig, FlowGeometry
from flas_vllm.core.rope import RopeTable, apply_rope, rope_cos_sin
from flas_vllm.core.eager_numerics import mean_square, rounded

TIME_EMBED_DIM = 128
CONCEPT_MASK_VALUE = -1e4


# ---------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm in the base family's formula (same tensor names, different meaning of the weight).

    offset=True (Gemma): float32 math, `(1 + w)` scale, one rounding to the input dtype.
    offset=False (Qwen3, Llama): `w * x^.to(dtype)`: normalised in float32, rounded, then scaled.
    """

    def __init__(self, dim: int, eps: float, offset: bool = True):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(mean_square(x) + self.eps)
        if not self.offset:
            return rounded(self.weight * rounded(xf.to(x.dtype)))
        return rounded((xf * (1.0 + self.weight.float())).to(x.dtype))


def flow_norm(g: FlowGeometry, dim: int) -> RMSNorm:
    return RMSNorm(dim, g.rms_norm_eps, g.norm_offset)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"hidden_activation {name!r} is not supported by the FLAS flow")


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return rounded(rounded(torch.tanh(rounded(logits / cap))) * cap)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the flowtime, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, bias: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [...] in the flow dtype -> [..., H]. Frequencies stay float32 whatever the flow dtype."""
        half = TIME_EMBED_DIM // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[..., None] * freqs
        emb = torch.cat((torch.sin(args), torch.cos(args)), dim=-1)
        return self.mlp(rounded(emb.to(self.mlp[0].weight.dtype)))


# ---------------------------------------------------------------------------
# attention


def expand_concept_kv(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., Lc, nKV, D] -> contiguous [..., nH, Lc, D], each KV head repeated for its query group.

    Contiguous operands: CPU matmul on strided ones picks a different kernel for a single
    token, which would make a request's last bits depend on the rest of its batch.
    """
    groups = num_heads // kv.shape[-2]
    return kv.repeat_interleave(groups, dim=-2).transpose(-3, -2).contiguous()


def cross_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    cap: float | None,
) -> torch.Tensor:
    """Attention of tokens to a concept: q [..., N, nH, D]; k, v [..., Lc, nKV, D]; valid [..., Lc].

    Leading dims batch independent (token, concept) pairs. Quirks: scale is
    head_dim**-0.5 (not query_pre_attn_scalar); padding is masked to -1e4
    after the softcap.
    """
    nh = q.shape[-2]
    return cross_attend_heads(q, expand_concept_kv(k, nh), expand_concept_kv(v, nh), valid, cap)


def cross_attend_heads(q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, valid: torch.Tensor | None,
                       cap: float | None) -> torch.Tensor:
    """`cross_attend` on head-major keys/values [..., nK, Lc, D]: nK = nH (`expand_concept_kv`) or the KV
    heads (the slot table), query head h reading key head h // (nH / nK), one product per key head."""
    *lead, n, nh, d = q.shape
    nk = kk.shape[-3]
    qh = q.transpose(-3, -2).reshape(*lead, nk, nh // nk * n, d)  # a key head's query heads stacked
    logits = rounded(torch.matmul(qh, kk.transpose(-1, -2)) * d ** -0.5)  # [..., nK, (nH/nK) * N, Lc]
    logits = softcap(logits, cap)
    if valid is not None:
        logits = logits.masked_fill(~valid[..., None, None, :], CONCEPT_MASK_VALUE)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vv).reshape(*lead, nh, n, d).transpose(-3, -2)  # [..., N, nH, D]


class ConceptKV(Protocol):
    """Where cross-attention finds the concept's projected keys and values.

    `attend(block, q)` gets the block's queries [N, nH, D] (after q_norm and RoPE)
    and returns the attention output [N, nH, D].
    """

    def attend(self, block: int, q: torch.Tensor) -> torch.Tensor: ...


class SelfAttentionCore(Protocol):
    """Causal attention over a request's own stream at one (Euler step, block).

    q: [..., nH*D], k/v: [..., nKV*D], RoPE already applied; returns [..., nH*D].
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


FusedProjection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # linears of one input as one GEMM


class _Projections(nn.Module):
    """q/k/v/o projections with the base model's attention geometry (both attentions use them)."""

    def __init__(self, g: FlowGeometry):
        super().__init__()
        self.g = g
        d, bias = g.head_dim, g.attention_bias
        self.q_proj = nn.Linear(g.hidden_size, g.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(g.hidden_size, g.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(g.hidden_size, g.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(g.num_heads * d, g.hidden_size, bias=bias)


class ConceptCrossAttention(_Projections):
    def __init__(self, g: FlowGeometry):
        super().__init__(g)
        self.q_norm = flow_norm(g, g.head_dim)
        self.k_norm = flow_norm(g, g.head_dim)

    def project_concept(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of an encoded concept c [Lc, H]; RoPE positions 0..Lc-1 (quirk)."""
        g = self.g
        lc = c.shape[0]
        k = self.k_norm(self.k_proj(c).view(lc, g.num_kv_heads, g.head_dim))
        v = self.v_proj(c).view(lc, g.num_kv_heads, g.head_dim)
        pos = torch.arange(lc, device=c.device)
        cos, sin = rope_cos_sin(pos, g.head_dim, g.rope_theta, k.dtype, g.rope_scaling)
        return apply_rope(k, cos, sin), v

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        g = self.g
        q = self.q_proj(x).view(-1, g.num_heads, g.head_dim)
        return apply_rope(self.q_norm(q), cos, sin)  # q norm BEFORE RoPE (quirk)


class FlowSelfAttention(_Projections):
    """The base model's attention math (with its per-head q/k norms where the family has them);
    the KV handling is the pluggable core."""

    def __init__(self, g: FlowGeometry):
        super().__init__(g)
        if g.self_attn_qk_norm:
            self.q_norm = flow_norm(g, g.head_dim)
            self.k_norm = flow_norm(g, g.head_dim)
        self.qkv_proj: FusedProjection | None = None  # the engine's one q/k/v GEMM (engine/flow_linears.py)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v of x: three GEMMs, or the engine's one fused GEMM (the same columns)."""
        return self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, core: SelfAttentionCore
    ) -> torch.Tensor:
        g = self.g
        lead = x.shape[:-1]
        q, k, v = self.project_qkv(x)
        q = q.reshape(*lead, g.num_heads, g.head_dim)
        k = k.reshape(*lead, g.num_kv_heads, g.head_dim)
        if g.self_attn_qk_norm:  # before RoPE: cached keys are post-norm, post-RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = core(q.reshape(*lead, -1), k.reshape(*lead, -1), v)
        return self.o_proj(out)


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    cap: float | None,
) -> torch.Tensor:
    """q: [B, Tq, nH, D]; k, v: [B, Tk, nKV, D]; allowed: [B, Tq, Tk] bool -> [B, Tq, nH, D]."""
    groups = q.shape[-2] // k.shape[-2]
    kk = k.repeat_interleave(groups, dim=-2).transpose(1, 2)  # [B, nH, Tk, D]
    vv = v.repeat_interleave(groups, dim=-2).transpose(1, 2)
    logits = torch.matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale
    logits = softcap(logits, cap)
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vv).transpose(1, 2)


# ---------------------------------------------------------------------------
# the flow


class FlowBlock(nn.Module):
    def __init__(self, g: FlowGeometry, cfg: FlasConfig):
        super().__init__()
        h = g.hidden_size
        self.has_cross = not cfg.disable_cross_attn
        self.has_self = not cfg.disable_self_attn
        self.has_mlp = not cfg.disable_mlp
        if self.has_cross:
            self.pre_cross_norm = flow_norm(g, h)
            self.post_cross_norm = flow_norm(g, h)
            self.cross_attn = ConceptCrossAttention(g)
            self.cross_gate = nn.Parameter(torch.zeros(h))
        if self.has_self:
            self.pre_sa_norm = flow_norm(g, h)
            self.post_sa_norm = flow_norm(g, h)
            self.self_attn = FlowSelfAttention(g)
            self.self_attn_gate = nn.Parameter(torch.zeros(h))
        if self.has_mlp:
            self.pre_mlp_norm = flow_norm(g, h)
            self.post_mlp_norm = flow_norm(g, h)
            self.gate_proj = nn.Linear(h, g.intermediate_size, bias=False)
            self.up_proj = nn.Linear(h, g.intermediate_size, bias=False)
            self.down_proj = nn.Linear(g.intermediate_size, h, bias=False)
            self.mlp_gate = nn.Parameter(torch.zeros(h))
            self.act = activation(g.hidden_activation)
            self.gate_up_proj: FusedProjection | None = None  # the engine's one gate/up GEMM

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)), x = pre_mlp_norm(h); gate/up as two GEMMs or the engine's fused one."""
        if self.gate_up_proj is None:
            x = self.pre_mlp_norm(h)
            return self.down_proj(rounded(rounded(self.act(self.gate_proj(x))) * self.up_proj(x)))
        gate, up = self.gate_up_proj(self.pre_mlp_norm(h))  # the norm's output freed once projected
        # At the separate GEMMs' peak: the product in place (a third [tokens, intermediate] buffer beside
        # the fused output would raise it; the engine never trains, nothing saves act's output), and the
        # fused output released before down_proj allocates.
        x = rounded(rounded(self.act(gate)).mul_(up))
        del gate, up
        return self.down_proj(x)


class FlowFunction(nn.Module):
    """v(h, t, c): parameters named exactly as in released FLAS checkpoints."""

    def __init__(self, g: FlowGeometry, cfg: FlasConfig):
        super().__init__()
        self.g = g
        self.cfg = cfg
        self.time_embed = TimeEmbedding(g.hidden_size)
        self.blocks = nn.ModuleList(FlowBlock(g, cfg) for _ in range(cfg.num_blocks))
        self.self_attn_scale = g.query_pre_attn_scalar**-0.5
        self.rope = RopeTable(g.head_dim, g.rope_theta, g.rope_scaling)  # an engine builds its table once

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed.mlp[0].weight.dtype

    @property
    def uses_self_attention(self) -> bool:
        return not self.cfg.disable_self_attn

    def project_concept(self, c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per-block cross-attention keys/values of an encoded concept c [Lc, H] (flow dtype)."""
        return [b.cross_attn.project_concept(c) if b.has_cross else None for b in self.blocks]

    def forward(
        self,
        h: torch.Tensor,
        te: torch.Tensor,
        positions: torch.Tensor,
        concept: ConceptKV,
        self_attn_cores: Sequence[SelfAttentionCore | None],
    ) -> torch.Tensor:
        """h: [..., H] (flow dtype); te: time embedding broadcastable to h; positions: h.shape[:-1]."""
        g = self.g
        h_in = h
        cos, sin = self.rope(positions, h.dtype)
        lead = h.shape[:-1]
        for i, block in enumerate(self.blocks):
            h = rounded(h + te)  # quirk: the time embedding enters at EVERY block
            # Intermediates are passed rather than named, or deleted once used: each [tokens, hidden] one
            # left alive would add to the memory peak the MLP sets (benchmarks/flow_memory.py).
            if block.has_cross:
                q = block.cross_attn.queries(block.pre_cross_norm(h).reshape(-1, g.hidden_size),
                                             cos.reshape(-1, g.head_dim), sin.reshape(-1, g.head_dim))
                out = concept.attend(i, q).reshape(*lead, -1)
                del q
                h = rounded(h + rounded(block.cross_gate * block.post_cross_norm(block.cross_attn.o_proj(out))))
                del out
            if block.has_self:
                out = block.self_attn(block.pre_sa_norm(h), cos, sin, self_attn_cores[i])
                h = rounded(h + rounded(block.self_attn_gate * block.post_sa_norm(out)))
                del out
            if block.has_mlp:
                h = rounded(h + rounded(block.mlp_gate * block.post_mlp_norm(block.mlp(h))))
        return rounded(h - h_in)


def euler_dt(flowtime: torch.Tensor | float, n_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """dt = T / N in float32, rounded to the flow dtype (quirk: bf16 T=2, N=3 -> 0.66796875)."""
    t = torch.as_tensor(flowtime, dtype=torch.float32)
    return (t / n_steps).to(dtype)


def integrate(
    flow: FlowFunction,
    h: torch.Tensor,
    dt: torch.Tensor,
    n_steps: int,
    positions: torch.Tensor,
    concept: ConceptKV,
    cores: Sequence[Sequence[SelfAttentionCore | None]],
    token_steps: torch.Tensor | None = None,
    time_embedding: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler-integrate the flow from t=0. h: [..., H] flow dtype; dt: [...] flow dtype.

    `cores[k][b]` is the self-attention core of Euler step k, block b. Each
    product and sum is rounded to the flow dtype, as in the original.
    `token_steps` ([...], optional): each element's own number of Euler steps
    (its dt is T / its N); it keeps its h once its steps are done, so a batch that
    mixes step counts gives each element exactly what a run of its own N gives.
    `time_embedding` (optional): k -> each element's time_embed(t_k), precomputed (engine/time_table.py).
    """
    dt = dt.to(h.dtype)
    for k in range(n_steps):
        te = flow.time_embed(rounded(dt * k)) if time_embedding is None else time_embedding(k)  # t_k = dt * k
        stepped = rounded(h + rounded(dt[..., None] * flow(h, te, positions, concept, cores[k])))
        del te  # neither alive through the next step's flow (memory)
        h = stepped if token_steps is None else torch.where((token_steps > k)[..., None], stepped, h)
        del stepped
    return h


# ---------------------------------------------------------------------------
# concept key/value providers


class SingleConceptKV:
    """One concept shared by every token (the transformers path, concept-cache fills)."""

    def __init__(self, per_block_kv: list[tuple[torch.Tensor, torch.Tensor] | None], cap: float | None):
        self.per_block_kv = per_block_kv
        self.cap = cap

    def attend(self, block: int, q: torch.Tensor) -> torch.Tensor:
        k, v = self.per_block_kv[block]
        return cross_attend(q, k, v, None, self.cap)
