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
