"""The throughput ceiling implied by FLOPs: flow vs base layers, per token."""

from __future__ import annotations


from typing import Any

from flas_vllm.bench.config import BenchConfig
from flas_vllm.bench.models import BenchModel, GEMMA2_2B_DIMS
from flas_vllm.bench.workload import Workload


# ---------------------------------------------------------------------------
# analytic FLOPs


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def base_flops_per_token(base: Any, context: float) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of one token of the base model at `context` keys attended.

    Counted: Q/K/V/O projections, attention scores and values (sliding layers see
    min(context, window)), the gated MLP, the LM head. Not counted: norms,
    embeddings look-up, soft-caps, RoPE (all O(H) per token).
    """
    h = int(_get(base, "hidden_size"))
    nh = int(_get(base, "num_attention_heads"))
    nkv = int(_get(base, "num_key_value_heads") or nh)
    d = int(_get(base, "head_dim") or h // nh)
    inter = int(_get(base, "intermediate_size"))
    layers = int(_get(base, "num_hidden_layers"))
    vocab = int(_get(base, "vocab_size"))
    window = _get(base, "sliding_window")
    types = list(_get(base, "layer_types") or [])
    if len(types) != layers:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    proj = 2 * h * (nh * d + 2 * nkv * d) + 2 * nh * d * h
    mlp = 2 * 3 * h * inter
    attn = 0.0
    for t in types:
        ctx = min(context, window) if (t == "sliding_attention" and window) else context
        attn += 4 * nh * d * ctx
    layer_total = layers * (proj + mlp) + attn
    head = 2 * h * vocab
    return {"projections": layers * proj, "mlp": layers * mlp, "attention": attn, "lm_head": head,
            "total": layer_total + head}


def flow_flops_per_token(base: Any, flas: Any, n_steps: int, context: float) -> dict[str, float]:
    """Forward FLOPs of the FLAS flow for one steered token.

    n_steps x num_blocks x (cross-attention projections + attention over concept_max_len
    concept keys + self-attention + MLP). The slot table attends over all concept_max_len
    (64) key slots, masked, whatever the concept's length. The concept's own K/V projection
    runs once per concept, the time embedding once per step size in flight (engine/time_table.py):
    both amortized, not counted (`time_embedding` is what it would cost per token).
    """
    from flas_vllm.core.flow import TIME_EMBED_DIM  # lazy: torch, via core.flow

    h = int(_get(base, "hidden_size"))
    nh = int(_get(base, "num_attention_heads"))
    nkv = int(_get(base, "num_key_value_heads") or nh)
    d = int(_get(base, "head_dim") or h // nh)
    inter = int(_get(base, "intermediate_size"))
    blocks = int(_get(flas, "num_blocks"))
    lc = int(_get(flas, "concept_max_len", 64) or 64)
    time_embed = 2 * (TIME_EMBED_DIM * h + h * h)
    cross = 0 if _get(flas, "disable_cross_attn", False) else 2 * h * nh * d + 2 * nh * d * h + 4 * nh * d * lc
    self_attn = 0 if _get(flas, "disable_self_attn", False) else (
        2 * h * (nh * d + 2 * nkv * d) + 2 * nh * d * h + 4 * nh * d * context)
    mlp = 0 if _get(flas, "disable_mlp", False) else 2 * 3 * h * inter
    per_block = cross + self_attn + mlp
    return {"time_embedding": n_steps * time_embed, "cross_attention": n_steps * blocks * cross,
            "self_attention": n_steps * blocks * self_attn, "mlp": n_steps * blocks * mlp,
            "total": n_steps * blocks * per_block}


def flops_ceiling(base: Any, flas: Any, n_steps: int, context: float) -> dict[str, Any]:
    b = base_flops_per_token(base, context)
    f = flow_flops_per_token(base, flas, n_steps, context)
    return {
        "context_tokens": round(context, 1),
        "base_flops_per_token": b["total"],
        "flow_flops_per_token": f["total"],
        "flow_over_base": round(f["total"] / b["total"], 5),
        "throughput_ceiling": round(b["total"] / (b["total"] + f["total"]), 5),
        "base_breakdown": b,
        "flow_breakdown": f,
    }


def flops_section(model: BenchModel, cfg: BenchConfig, wl: Workload) -> dict:
    from transformers import AutoConfig  # lazy: transformers is heavy

    from flas_vllm.core.checkpoint import load_checkpoint  # lazy: torch, via core.checkpoint

    base = AutoConfig.from_pretrained(str(model.model_dir))
    ckpt = load_checkpoint(str(model.checkpoint_dir), base)
    flas, n_steps = ckpt.config, ckpt.config.n_steps
    mean_prompt = wl.prompt_tokens / max(1, len(wl.prompts))
    ctx = mean_prompt + (cfg.output_len + 1) / 2.0  # mean context of a generated token
    flas_info = {"layer": flas.layer, "num_blocks": flas.num_blocks, "n_steps": n_steps,
                 "concept_max_len": flas.concept_max_len}
    return {
        "note": "ceiling = base / (base + flow) FLOPs per token with the flow on every token: fully steered "
                "batches, and every batch under FULL CUDA graphs (the graph path). Without CUDA graphs (CPU, "
                "eager) and between PIECEWISE graph pieces the flow runs only on a step's steered tokens "
                "(padded to a bucket), so mixed traffic sits between this ceiling and 1",
        "flas": flas_info,
        "at_mean_context": flops_ceiling(base, flas, n_steps, ctx),
        "weights_only": flops_ceiling(base, flas, n_steps, 0.0),
        "reference_gemma_2_2b_dims": {
            "note": "analytic only: google/gemma-2-2b-it dimensions (256k vocab) with this flow config",
            **flops_ceiling(GEMMA2_2B_DIMS, flas, n_steps, ctx),
        },
    }


