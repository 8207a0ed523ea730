"""Random FLAS checkpoints in the official layout, for tests, the demo and benchmarks.

They are built from the one flow definition (`flas_vllm.core.flow.FlowFunction`),
so their tensor names are exactly the ones released checkpoints use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flas_vllm.core.flow import FlowFunction

# Bump when the random recipe changes: cached checkpoints live under this version.
RECIPE_VERSION = 3
# Strong enough that steering changes greedy output of the (confident) trained tiny model.
GATE_SCALE = 2.0


def randomize_flow(flow: FlowFunction, seed: int, *, gate_scale: float = 1.0, norm_std: float = 0.2,
                   bias_std: float = 0.02) -> FlowFunction:
    """Seeded random weights, in place: gates in gate_scale*[0.5, 1.5), fan-in-scaled matrices.

    Norm weights scatter around the family's identity: 0 for Gemma's (1 + w), 1 for plain norms.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_base = 0.0 if flow.g.norm_offset else 1.0
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("_gate"):
                p.copy_(gate_scale * (0.5 + torch.rand(p.shape, generator=gen)))
            elif "norm" in name:
                p.copy_(norm_base + norm_std * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return flow


def make_random_flas_checkpoint(
    out_dir: str | Path,
    base_model_dir: str | Path,
    *,
    num_blocks: int = 1,
    layer: int = 2,
    n_steps: int = 3,
    disable_self_attn: bool = False,
    disable_cross_attn: bool = False,
    disable_mlp: bool = False,
    dtype: str = "float32",
    fmt: str = "safetensors",
    seed: int = 0,
    gate_scale: float = GATE_SCALE,
    legacy_extra_tensors: bool = False,
    concept_max_len: int = 64,
    prompt_format: str = "chat",
    concept_encoder: bool = False,
    bare_state_dict: bool = False,
    no_config: bool = False,
) -> Path:
    """A random flow whose gates and norms are large enough to change greedy output visibly.

    Returns the checkpoint directory (config.json + one weights file). Training-checkpoint
    shapes the original also loads: `concept_encoder` (a .pt with its own `concept_enc`),
    `bare_state_dict` (a .pt holding only the flow's state dict), `no_config` (no config.json).
    """
    if (concept_encoder or bare_state_dict) and fmt != "pt":
        raise ValueError("concept_encoder / bare_state_dict checkpoints are .pt files (fmt='pt')")
    from transformers import AutoConfig

    from flas_vllm.core.checkpoint import save_checkpoint
    from flas_vllm.core.config import FlasConfig, FlowGeometry

    base = AutoConfig.from_pretrained(str(base_model_dir))
    geometry = FlowGeometry.from_base_config(base)
    cfg = FlasConfig(
        model_id=str(base_model_dir), layer=layer, num_blocks=num_blocks, n_steps=n_steps,
        disable_self_attn=disable_self_attn, concept_max_len=concept_max_len, prompt_format=prompt_format,
    )
    # As the original: disable_cross_attn / disable_mlp blocks still hold (and save) those modules.
    flow = randomize_flow(FlowFunction(geometry, cfg), seed, gate_scale=gate_scale)
    flow = flow.to(getattr(torch, dtype))
    out = Path(out_dir)
    extra = {"T_min": 0.5, "T_max": 2.0, "seed": seed, "disable_cross_attn": disable_cross_attn,
             "disable_mlp": disable_mlp}
    path = save_checkpoint(out, flow, fmt=fmt, extra_config=extra)
    if concept_encoder:
        _add_own_concept_encoder(path, base_model_dir, seed, getattr(torch, dtype))
    if bare_state_dict:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        torch.save(blob["flow_fn"], str(path))
    if no_config:
        (out / "config.json").unlink()
    if legacy_extra_tensors:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        tensors["blocks.0.legacy_unused.weight"] = torch.zeros(4, dtype=flow.dtype)
        save_file(tensors, str(path))
    return out


def ensure_flas_checkpoint(base_model_dir: str | Path, **variant) -> Path:
    """A cached random checkpoint for `base_model_dir`, one directory per variant."""
    from flas_vllm.testing.fixtures import fixture_cache_dir

    key = "-".join(f"{k}={variant[k]}" for k in sorted(variant)) or "default"
    out = fixture_cache_dir() / f"flas-checkpoints-v{RECIPE_VERSION}" / Path(base_model_dir).name / key
    marker = out / ".complete"
    if not marker.exists():
        import shutil
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
        make_random_flas_checkpoint(tmp, base_model_dir, **variant)
        (tmp / ".complete").write_text(json.dumps(variant, sort_keys=True))
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_own_concept_encoder(path: Path, base_model_dir: str | Path, seed: int, dtype: torch.dtype) -> None:
    """Store a fine-tuned-looking encoder: the base model's embedding, layers 0-1 and norm, perturbed."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32).model
    gen = torch.Generator().manual_seed(seed + 1000)
    enc = {}
    for name, t in base.state_dict().items():
        if name.startswith("layers.") and int(name.split(".")[1]) >= 2:
            continue
        if "rotary" in name:
            continue
        enc[name] = (t + 0.05 * t.abs().mean() * torch.randn(t.shape, generator=gen)).to(dtype)
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    blob["concept_enc"] = enc
    torch.save(blob, str(path))
