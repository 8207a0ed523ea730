"""Benchmark models: the tiny fixture and narrow random models with real models' proportions."""

from __future__ import annotations


import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flas_vllm.fixtures.family_models import ensure_family_model
from flas_vllm.fixtures.tiny_gemma2 import ensure_tiny_gemma2, file_lock, fixture_cache_dir, save_model


MODELS = ("fixture", "bench-2b-shape", "bench-qwen3-8b-shape")
DEFAULT_KS = (1, 8, 64, 256, 1024)
DEFAULT_OUT = Path("benchmarks/results")
MIB = 1024 * 1024

# Gemma-2-2B's proportions (26 layers, FLAS after layer 20, sliding/full alternating,
# soft-caps, query_pre_attn_scalar = head_dim as in 2B), scaled down in width so it
# runs in minutes on a CPU. The vocabulary is the fixture tokenizer's (1536 tokens),
# so the LM head is far smaller relative to the layers than in the real 2B (256k vocab);
# `flops` in the report also gives the analytic numbers for the real 2B dimensions.
BENCH_2B_SHAPE_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 64,
    "sliding_window": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 13,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "dtype": "float32",
}
BENCH_2B_SHAPE_FLAS = {"num_blocks": 1, "layer": 20, "n_steps": 3}
# Qwen3-8B's proportions (36 full-attention layers, FLAS after layer 20, 4:1 GQA, head_dim 128
# wider than hidden/heads, plain norms, theta 1e6, untied head), scaled down in width; the
# checkpoint follows the recipe of the non-Gemma-2 releases (one block, no self-attention).
BENCH_QWEN3_8B_SHAPE_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 36,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
    "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False, "attention_dropout": 0.0, "dtype": "float32",
}
BENCH_QWEN3_8B_SHAPE_FLAS = {"num_blocks": 1, "layer": 20, "n_steps": 3, "disable_self_attn": True}
# shaped model -> (fixture family giving the tokenizer, transformers class prefix, config, checkpoint variant)
SHAPED_MODELS: dict[str, tuple[str, str, dict, dict]] = {
    "bench-2b-shape": ("gemma2", "Gemma2", BENCH_2B_SHAPE_CONFIG, BENCH_2B_SHAPE_FLAS),
    "bench-qwen3-8b-shape": ("qwen3", "Qwen3", BENCH_QWEN3_8B_SHAPE_CONFIG, BENCH_QWEN3_8B_SHAPE_FLAS),
}
FIXTURE_FLAS = {"num_blocks": 1}  # layer 2, n_steps 3 (make_random_flas_checkpoint's defaults)

# The real google/gemma-2-2b-it dimensions, for the analytic FLOPs ceiling only.
GEMMA2_2B_DIMS: dict[str, Any] = {
    "model_type": "gemma2",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
    "sliding_window": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 13,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
}


# ---------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_dir: Path
    checkpoint_dir: Path


def prepare_model(name: str) -> BenchModel:
    """Build (or reuse from the cache) the model and a random FLAS checkpoint for it."""
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint  # lazy: torch, via fixtures.checkpoints

    fixture = ensure_tiny_gemma2()
    if name == "fixture":
        return BenchModel(name, fixture, ensure_flas_checkpoint(fixture, **FIXTURE_FLAS))
    if name in SHAPED_MODELS:
        family, _, _, variant = SHAPED_MODELS[name]
        model_dir = ensure_bench_shape(name, ensure_family_model(family))
        return BenchModel(name, model_dir, ensure_flas_checkpoint(model_dir, **variant))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _bench_key(name: str, fixture_dir: Path) -> str:
    try:
        fixture_key = json.loads((fixture_dir / ".flas_fixture.json").read_text()).get("key", "")
    except (OSError, ValueError):
        fixture_key = ""
    blob = json.dumps({"config": SHAPED_MODELS[name][2], "fixture": fixture_key, "seed": 0, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_bench_shape(name: str, fixture_dir: Path) -> Path:
    """A real model's proportions with random weights (no training), cached; tokenizer from the fixture."""
    key = _bench_key(name, fixture_dir)
    cache = fixture_cache_dir()
    out = cache / f"{name}-{key}"
    if (out / ".complete").exists():
        return out
    with file_lock(cache / f".{name}.lock"):
        if (out / ".complete").exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache))
        try:
            build_bench_shape(name, tmp, fixture_dir)
            (tmp / ".complete").write_text(json.dumps({"key": key}) + "\n")
            os.chmod(tmp, 0o755)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def build_bench_shape(name: str, out_dir: Path, fixture_dir: Path, *, seed: int = 0) -> Path:
    # lazy: torch and transformers are heavy
    import torch
    import transformers

    _, prefix, config, _ = SHAPED_MODELS[name]
    fixture_cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg = dict(config)
    for k in ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id"):
        if k in fixture_cfg:
            cfg[k] = fixture_cfg[k]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    model = model_cls(getattr(transformers, f"{prefix}Config")(**cfg)).to(torch.float32).eval()
    save_model(model, out_dir)  # safetensors, float32
    # tokenizer, chat template and generation config from the fixture (written after
    # save_pretrained, which writes its own generation_config.json)
    skip = {"config.json", "model.safetensors", ".flas_fixture.json"}
    for f in fixture_dir.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out_dir / f.name)
    return out_dir


