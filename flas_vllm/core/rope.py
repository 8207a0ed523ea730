"""The flow's rotary position embedding: the family's RoPE variant, frequencies rounded to the flow dtype."""

from __future__ import annotations

import math

import torch
from torch import nn

from flas_vllm.core.eager_numerics import rounded


def rope_inv_freq(head_dim: int, theta: float, scaling=(), device=None) -> torch.Tensor:
    """float32 inverse frequencies: default, `linear` (all / factor) or `llama3` (band-wise) RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    s = dict(scaling)
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, orig = s["factor"], s["original_max_position_embeddings"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > orig / low, inv / factor, inv)  # long wavelengths: divided
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= orig / high) & (wavelen <= orig / low)
        return torch.where(middle, blended, scaled)
    return inv


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling=()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables for the flow, in float32, then cast to the flow dtype (spec 2, 3.2).

    Quirk: the original's flow owns its rotary module and casting the flow to the
    checkpoint dtype casts its inverse frequencies too, so they are rounded to `dtype`
    (bf16 for released checkpoints) before `positions * inv_freq` is formed in float32.
    At head_dim 256 this moves the steered stream by 10-15% at positions 250-500.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    inv_freq = inv_freq.to(dtype).to(torch.float32)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, D]; cos/sin: [..., D] (broadcast over heads). Each product and the sum round to x's dtype."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return rounded(rounded(x * cos) + rounded(rotated * sin))


class RopeTable(nn.Module):
    """The flow's cos/sin tables: computed per call, or looked up in a table built once.

    A compiler regenerates `rope_cos_sin` with its own cos/sin code and may drop the
    rounding of the inverse frequencies; a table built eagerly at start-up (as vLLM's
    rotary embedding keeps its cos/sin cache) is read by index, so a compiled graph gets
    exactly the eager values. Without a table (the transformers path), tables are computed.
    """

    def __init__(self, head_dim: int, theta: float, scaling=()):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)

    @torch.no_grad()
    def build(self, max_positions: int, dtype: torch.dtype, device=None) -> None:
        positions = torch.arange(max_positions, device=device)
        self.cos, self.sin = rope_cos_sin(positions, self.head_dim, self.theta, dtype, self.scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.dtype != dtype:
            return rope_cos_sin(positions, self.head_dim, self.theta, dtype, self.scaling)
        return self.cos[positions], self.sin[positions]
