"""FlasLLM: `vllm.LLM` with a FLAS checkpoint attached; everything else is plain vLLM."""

from __future__ import annotations

from typing import Any


def base_model_config(model: str, **kwargs: Any):
    """The base model's HF config (its family picks the FLAS architecture)."""
    from transformers import AutoConfig

    keep = {k: kwargs[k] for k in ("revision", "trust_remote_code") if kwargs.get(k) is not None}
    return AutoConfig.from_pretrained(str(model), **keep)


def flas_engine_kwargs(
    model: str,
    flas_checkpoint: str,
    *,
    n_steps: int | None = None,
    max_n_steps: int | None = None,
    max_concepts: int | None = None,
    max_flowtime: float | None = None,
    max_pinned: int | None = None,
    **vllm_kwargs: Any,
) -> dict[str, Any]:
    """vLLM engine arguments that load `model` (any supported family) as its FLAS architecture.

    Multimodal checkpoints (Gemma-3) run their text decoder only: images are refused by vLLM
    (`limit_mm_per_prompt` 0) and the vision tower is never built (`language_model_only`).
    """
    from flas_vllm.families import architecture_for, is_multimodal

    base = base_model_config(model, **vllm_kwargs)
    flas: dict[str, Any] = {"checkpoint": str(flas_checkpoint)}
    for key, value in (("n_steps", n_steps), ("max_n_steps", max_n_steps), ("max_concepts", max_concepts),
                       ("max_flowtime", max_flowtime), ("max_pinned", max_pinned)):
        if value is not None:
            flas[key] = value
    overrides = dict(vllm_kwargs.pop("hf_overrides", None) or {})
    overrides["architectures"] = [architecture_for(base)]
    overrides["flas"] = {**overrides.get("flas", {}), **flas}
    if is_multimodal(base):
        vllm_kwargs.setdefault("limit_mm_per_prompt", {"image": 0})
        vllm_kwargs.setdefault("language_model_only", True)
    return {"model": str(model), "hf_overrides": overrides, **vllm_kwargs}


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM` or `FlasLLM` engine core now (frees its memory before the next engine starts)."""
    import gc

    inner = getattr(llm, "llm", llm)
    try:
        inner.llm_engine.engine_core.shutdown()
    except Exception:  # already gone
        pass
    gc.collect()


class FlasLLM:
    """A thin layer over `vllm.LLM`: same generate/chat API, plus concept management.

    `chat` formats prompts the way the checkpoint was trained: its chat template, or, for a
    checkpoint trained on a base model (`prompt_format: alpaca`), the alpaca format.
    """

    def __init__(self, model: str, flas_checkpoint: str, *, n_steps: int | None = None,
                 max_n_steps: int | None = None, max_concepts: int | None = None,
                 max_flowtime: float | None = None, max_pinned: int | None = None, **vllm_kwargs: Any):
        from vllm import LLM

        from flas_vllm.checkpoint import read_checkpoint_config
        from flas_vllm.plugin import register

        register()
        self.prompt_format = read_checkpoint_config(flas_checkpoint).prompt_format
        kwargs = flas_engine_kwargs(model, flas_checkpoint, n_steps=n_steps, max_n_steps=max_n_steps,
                                    max_concepts=max_concepts, max_flowtime=max_flowtime, max_pinned=max_pinned,
                                    **vllm_kwargs)
        kwargs.setdefault("worker_extension_cls", "flas_vllm.worker_ext.FlasWorkerExtension")
        self.llm = LLM(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, **kwargs)

    def chat(self, *args, **kwargs):
        from flas_vllm.prompts import ALPACA_CHAT_TEMPLATE, chat_template_kwargs

        if self.prompt_format == "alpaca" and kwargs.get("chat_template") is None:
            kwargs["chat_template"] = ALPACA_CHAT_TEMPLATE
        template = kwargs.get("chat_template") or getattr(self.llm.get_tokenizer(), "chat_template", None)
        # non-thinking by default (Qwen3), as the original; a caller's own kwargs win
        kwargs["chat_template_kwargs"] = {**chat_template_kwargs(template), **(kwargs.get("chat_template_kwargs") or {})}
        return self.llm.chat(*args, **kwargs)

    # -- concept management (runs in every worker) -------------------------------------

    def preload_concepts(self, concepts: list[str]) -> list:
        return self.llm.collective_rpc("flas_preload", args=(list(concepts),))[0]

    def evict_concepts(self, concepts: list[str]) -> list:
        return self.llm.collective_rpc("flas_evict", args=(list(concepts),))[0]

    def concept_stats(self) -> dict:
        return self.llm.collective_rpc("flas_stats")[0]
