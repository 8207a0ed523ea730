"""The `vllm.general_plugins` entry point: runs in every vLLM process, so it must be idempotent."""

from __future__ import annotations

import logging

logger = logging.getLogger("flas_vllm")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # No process-wide settings here: other models in this process keep vLLM's defaults. The runner
    # choice for FLAS engines alone lives in patches/engine_config.py.
    from vllm import ModelRegistry

    from flas_vllm.core.families import FAMILIES

    supported = ModelRegistry.get_supported_archs()
    for family in FAMILIES:  # one architecture per family (and per multimodal wrapper), built lazily
        for arch in filter(None, (family.architecture, family.multimodal_architecture)):
            if arch not in supported:
                ModelRegistry.register_model(arch, f"flas_vllm.engine.model:{arch}")
    from flas_vllm.engine import patches

    patches.install_all()
    _registered = True
