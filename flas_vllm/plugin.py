"""The `vllm.general_plugins` entry point: runs in every vLLM process, so it must be idempotent."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("flas_vllm")

ARCHITECTURE = "FlasGemma2ForCausalLM"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # FLAS publishes per-step data through the V1 runner hook; Model Runner V2 (the GPU
    # default) is not implemented yet, so unless the user chose explicitly we ask for V1.
    if os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0") == "0":
        logger.debug("flas-vllm: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "flas_vllm.model:FlasGemma2ForCausalLM")
    from flas_vllm import patches

    patches.install_all()
    _registered = True
