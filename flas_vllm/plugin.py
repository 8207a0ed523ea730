"""The `vllm.general_plugins` entry point: runs in every vLLM process, so it must be idempotent."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("flas_vllm")

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

    from flas_vllm.families import FAMILIES

    supported = ModelRegistry.get_supported_archs()
    for family in FAMILIES:  # one architecture per family (and per multimodal wrapper), built lazily
        for arch in filter(None, (family.architecture, family.multimodal_architecture)):
            if arch not in supported:
                ModelRegistry.register_model(arch, f"flas_vllm.model:{arch}")
    from flas_vllm import patches

    patches.install_all()
    _registered = True
