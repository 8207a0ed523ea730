"""FlasLLM: `vllm.LLM` with a FLAS checkpoint attached; everything else is plain vLLM."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.errors import FlasConfigError
from flas_vllm.core.families import architecture_for, is_multimodal
from flas_vllm.core.prompts import ALPACA_CHAT_TEMPLATE, chat_template_kwargs
from flas_vllm.engine.plugin import register


def base_model_config(model: str, **kwargs: Any):
    """The base model's HF config (its family picks the FLAS architecture)."""
    from transformers import AutoConfig  # lazy: transformers is heavy

    keep = {k: kwargs[k] for k in ("revision", "trust_remote_code") if kwargs.get(k) is not None}
    if str(model).startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(str(model))):
        raise FlasConfigError(f"model {model!r}: no such directory (give a model directory or a Hugging Face id)")
    try:
        return AutoConfig.from_pretrained(str(model), **keep)
    except (OSError, ValueError) as exc:  # no such directory or hub id, no config.json, an unreadable one
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlasConfigError(f"model {model!r}: cannot read its config.json ({reason})") from exc


CPU_DEFAULT_KV_CACHE_BYTES = 2 << 30


def _on_cpu() -> bool:
    from vllm.platforms import current_platform  # lazy: vllm is heavy

    return current_platform.is_cpu()


def flas_engine_kwargs(
    model: str,
    flas_checkpoint: str,
    *,
    n_steps: int | None = None,
    max_n_steps: int | None = None,
    max_concepts: int | None = None,
    max_flowtime: float | None = None,
    max_pinned: int | None = None,
    graph_path: bool | None = None,
    flow_graphs: str | None = None,
    **vllm_kwargs: Any,
) -> dict[str, Any]:
    """vLLM engine arguments that load `model` (any supported family) as its FLAS architecture.

    Multimodal checkpoints (Gemma-3) run their text decoder only: images are refused by vLLM
    (`limit_mm_per_prompt` 0) and the vision tower is never built (`language_model_only`).
    """
    base = base_model_config(model, **vllm_kwargs)
    flas: dict[str, Any] = {"checkpoint": str(flas_checkpoint)}
    for key, value in (("n_steps", n_steps), ("max_n_steps", max_n_steps), ("max_concepts", max_concepts),
                       ("max_flowtime", max_flowtime), ("max_pinned", max_pinned), ("graph_path", graph_path),
                       ("flow_graphs", flow_graphs)):
        if value is not None:
            flas[key] = value
    if "kv_cache_memory_bytes" not in vllm_kwargs and "gpu_memory_utilization" not in vllm_kwargs and _on_cpu():
        # vLLM's CPU default reserves 92% of a NUMA node for the KV cache, which fails on any machine
        # running something else; take a fixed, ample budget instead (pass either flag to change it).
        vllm_kwargs["kv_cache_memory_bytes"] = CPU_DEFAULT_KV_CACHE_BYTES
    overrides = dict(vllm_kwargs.pop("hf_overrides", None) or {})
    overrides["architectures"] = [architecture_for(base)]
    overrides["flas"] = {**overrides.get("flas", {}), **flas}
    if is_multimodal(base):
        vllm_kwargs.setdefault("limit_mm_per_prompt", {"image": 0})
        vllm_kwargs.setdefault("language_model_only", True)
    return {"model": str(model), "hf_overrides": overrides, **vllm_kwargs}


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM` or `FlasLLM` engine core now (frees its memory before the next engine starts)."""
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
                 max_flowtime: float | None = None, max_pinned: int | None = None, graph_path: bool | None = None,
                 flow_graphs: str | None = None, **vllm_kwargs: Any):
        from vllm import LLM  # lazy: vllm is heavy

        from flas_vllm.core.checkpoint import read_checkpoint_config  # lazy: torch, via core.checkpoint

        register()
        self.prompt_format = read_checkpoint_config(flas_checkpoint).prompt_format
        kwargs = flas_engine_kwargs(model, flas_checkpoint, n_steps=n_steps, max_n_steps=max_n_steps,
                                    max_concepts=max_concepts, max_flowtime=max_flowtime, max_pinned=max_pinned,
                                    graph_path=graph_path, flow_graphs=flow_graphs, **vllm_kwargs)
        kwargs.setdefault("worker_extension_cls", "flas_vllm.engine.worker_ext.FlasWorkerExtension")
        self.options = FlasEngineOptions.from_mapping(kwargs["hf_overrides"]["flas"])  # checked before any load
        self.llm = LLM(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, **kwargs)

    def chat(self, *args, **kwargs):
        if self.prompt_format == "alpaca" and kwargs.get("chat_template") is None:
            kwargs["chat_template"] = ALPACA_CHAT_TEMPLATE
        template = kwargs.get("chat_template") or getattr(self.llm.get_tokenizer(), "chat_template", None)
        # non-thinking by default (Qwen3), as the original; a caller's own kwargs win
        kwargs["chat_template_kwargs"] = {**chat_template_kwargs(template), **(kwargs.get("chat_template_kwargs") or {})}
        return self.llm.chat(*args, **kwargs)

    # -- concept management (runs in every worker) -------------------------------------

    def preload_concepts(self, concepts: list[str]) -> list:
        return self.llm.collective_rpc("flas_preload", args=(list(concepts),))[0]

    def evict_concepts(self, concepts: list[str], settle_seconds: float = 2.0) -> list:
        """Unpin and drop concepts; False for one absent, or still held by a request in flight.

        A request that has just finished still holds its slot until the engine's next step tells the
        worker (vLLM sends finished ids with the following step). With nothing in flight, a concept
        reported in use is therefore asked about again for up to `settle_seconds`.
        """
        concepts = list(concepts)
        result = self.llm.collective_rpc("flas_evict", args=(concepts,))[0]
        deadline = time.monotonic() + settle_seconds
        while not all(result) and time.monotonic() < deadline and not self.llm.llm_engine.has_unfinished_requests():
            held = {e["concept"] for e in self.concept_stats()["concepts"] if e["refs"] > 0}
            retry = [c for c, ok in zip(concepts, result) if not ok and c in held]
            if not retry:
                break  # absent concepts stay False
            time.sleep(0.05)
            again = dict(zip(retry, self.llm.collective_rpc("flas_evict", args=(retry,))[0]))
            result = [ok or again.get(c, False) for c, ok in zip(concepts, result)]
        return result

    def concept_stats(self) -> dict:
        return self.llm.collective_rpc("flas_stats")[0]
