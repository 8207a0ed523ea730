"""Control-plane RPCs added to vLLM workers (`worker_extension_cls`): concept preload/evict/stats."""

from __future__ import annotations


class FlasWorkerExtension:
    def _flas_runtime(self):
        model = self.model_runner.get_model()
        runtime = getattr(model, "flas_runtime", None)
        if runtime is None:
            raise RuntimeError("this worker's model is not a FLAS model")
        return runtime

    def flas_preload(self, concepts: list[str]) -> list[int]:
        return self._flas_runtime().preload(concepts)

    def flas_evict(self, concepts: list[str]) -> list[bool]:
        return self._flas_runtime().evict(concepts)

    def flas_stats(self) -> dict:
        return self._flas_runtime().stats()

    def flas_flow_log(self) -> list[tuple[int, int, int]]:
        """The latest steps with flow work: (tokens, steered tokens, rows the flow computed), oldest first."""
        return list(self._flas_runtime().flow_log)

    def flas_kv_cache_dtypes(self) -> dict[str, tuple[str, str]]:
        """Per paged attention layer: (its kv_cache_dtype setting, dtype of its bound cache tensor)."""
        from vllm.model_executor.layers.attention import Attention  # lazy: vllm; this runs only inside its worker

        out = {}
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            if isinstance(layer, Attention):
                cache = layer.kv_cache
                cache = cache[0] if isinstance(cache, (list, tuple)) else cache
                out[name] = (str(layer.kv_cache_dtype), str(cache.dtype))
        return out
