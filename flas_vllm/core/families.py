"""The model families FLAS steers: one frozen record of facts per family, keyed by `model_type`.

Everything family-specific that the flow, the checkpoint loader, the vLLM model and the
transformers path need is read from here (the project's FLAS families notes, section 2); the code
that uses these facts is written once. Sizes, eps, RoPE parameters, softcaps and the
attention scale come from the base model's own config, not from here.

Chat-template arguments are not a family fact: the original passes `enable_thinking=False`
to any template that mentions it (Qwen3's), see `flas_vllm.core.prompts`.

Adding a family is one `Family` entry (plus a tiny fixture config for its tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from flas_vllm.core.errors import FlasCheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # text-config model_type values of this family
    # RMSNorm of every flow norm: Gemma's fp32 `x^ * (1 + w)` (weights start at 0), or the plain
    # `w * x^.to(dtype)` with two roundings (weights start at 1).
    norm_offset: bool
    # The flow's self-attention carries its own per-head q_norm/k_norm before RoPE (as the base attention).
    self_attn_qk_norm: bool
    # False: only `disable_self_attn` checkpoints exist for this family (the original refuses to train one).
    self_attn_supported: bool
    # The concept encoder's embedding is scaled by a model-dtype sqrt(hidden) (done by the base model's own
    # embedding in both vLLM and transformers; recorded for references and checks).
    embed_scale: bool
    # Where a config keeps RoPE parameters per layer type, the entry the flow uses.
    rope_layer_type: str | None
    # vLLM causal LM extended with the flow, and the name it is registered under.
    vllm_class: str
    architecture: str
    # Same for a multimodal checkpoint of this family (text decoder steered, images refused).
    multimodal_vllm_class: str | None = None
    multimodal_architecture: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gemma2", model_types=("gemma2",), norm_offset=True, self_attn_qk_norm=False,
        self_attn_supported=True, embed_scale=True, rope_layer_type=None,
        vllm_class="vllm.model_executor.models.gemma2:Gemma2ForCausalLM", architecture="FlasGemma2ForCausalLM",
    ),
    Family(
        name="gemma3", model_types=("gemma3", "gemma3_text"), norm_offset=True, self_attn_qk_norm=True,
        self_attn_supported=False, embed_scale=True, rope_layer_type="full_attention",
        vllm_class="vllm.model_executor.models.gemma3:Gemma3ForCausalLM", architecture="FlasGemma3ForCausalLM",
        multimodal_vllm_class="vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
        multimodal_architecture="FlasGemma3ForConditionalGeneration",
    ),
    Family(
        name="qwen3", model_types=("qwen3",), norm_offset=False, self_attn_qk_norm=True,
        self_attn_supported=True, embed_scale=False, rope_layer_type=None,
        vllm_class="vllm.model_executor.models.qwen3:Qwen3ForCausalLM", architecture="FlasQwen3ForCausalLM",
    ),
    Family(
        name="llama", model_types=("llama",), norm_offset=False, self_attn_qk_norm=False,
        self_attn_supported=True, embed_scale=False, rope_layer_type=None,
        vllm_class="vllm.model_executor.models.llama:LlamaForCausalLM", architecture="FlasLlamaForCausalLM",
    ),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
ARCHITECTURES = frozenset(a for f in FAMILIES for a in (f.architecture, f.multimodal_architecture) if a)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def text_config(base: Any) -> Any:
    """The text decoder's config: `text_config` of a multimodal config, else the config itself."""
    inner = _get(base, "text_config")
    return inner if inner else base


def is_multimodal(base: Any) -> bool:
    return bool(_get(base, "text_config"))


def family_of(base: Any) -> Family:
    """The family of a base model config (HF config or dict); unknown model types are refused."""
    model_type = _get(text_config(base), "model_type")
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise FlasCheckpointError(
            f"base model config: model_type {model_type!r} is not supported; flas-vllm steers "
            f"{', '.join(sorted(_BY_TYPE))} models"
        )
    return family


def family_by_architecture(name: str) -> Family:
    for f in FAMILIES:
        if name in (f.architecture, f.multimodal_architecture):
            return f
    raise KeyError(name)


def architecture_for(base: Any) -> str:
    """The registered FLAS architecture that steers this base model."""
    family = family_of(base)
    if is_multimodal(base):
        if family.multimodal_architecture is None:
            raise FlasCheckpointError(
                f"base model config: a multimodal {_get(base, 'model_type')!r} model is not supported "
                f"for family {family.name}")
        return family.multimodal_architecture
    return family.architecture
