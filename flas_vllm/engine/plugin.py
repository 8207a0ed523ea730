"""The `vllm.general_plugins` entry point: runs in every vLLM process, so it must be idempotent."""

from __future__ import annotations

import logging

from flas_vllm.core.families import FAMILIES
from flas_vllm.engine import patches
from flas_vllm.engine.log_routing import route_flas_logs_to_vllm

logger = logging.getLogger("flas_vllm")

_registered = False

TEXT_MODELS = "flas_vllm.engine.model"  # FlasGemma2ForCausalLM, FlasGemma3ForCausalLM, FlasQwen3ForCausalLM, ...
MULTIMODAL_MODELS = "flas_vllm.engine.model_multimodal"  # FlasGemma3ForConditionalGeneration


def steered_classes() -> dict[str, str]:
    """Every steered architecture (named in core/families.py) -> `module:class` where it is defined."""
    out = {f.architecture: f"{TEXT_MODELS}:{f.architecture}" for f in FAMILIES}
    out.update({f.multimodal_architecture: f"{MULTIMODAL_MODELS}:{f.multimodal_architecture}"
                for f in FAMILIES if f.multimodal_architecture})
    return out


def register() -> None:
    global _registered
    if _registered:
        return
    # No process-wide settings here: other models in this process keep vLLM's defaults. The runner
    # choice for FLAS engines alone lives in patches/engine_config.py.
    from vllm import ModelRegistry  # lazy: vllm is heavy

    route_flas_logs_to_vllm()
    supported = ModelRegistry.get_supported_archs()
    for arch, location in steered_classes().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, location)  # by path: vLLM imports the module when it loads one
    patches.install_all()
    _registered = True
