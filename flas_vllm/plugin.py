"""The `vllm.general_plugins` entry point: runs in every vLLM process, so it must be idempotent."""

from __future__ import annotations

import logging

logger = logging.getLogger("flas_vllm")

ARCHITECTURE = "FlasGemma2ForCausalLM"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # No process-wide settings here: other models in this process keep vLLM's defaults. The runner
    # choice for FLAS engines alone lives in patches/engine_config.py.
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "flas_vllm.model:FlasGemma2ForCausalLM")
    from flas_vllm import patches

    patches.install_all()
    _registered = True
