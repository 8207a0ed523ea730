"""flas-vllm: FLAS activation steering as a first-class vLLM model."""

from flas_vllm.core.errors import FlasCheckpointError, FlasError, SteeringParamError
from flas_vllm.core.steering import steering

__version__ = "0.1.0"

__all__ = ["FlasLLM", "steering", "FlasError", "FlasCheckpointError", "SteeringParamError", "__version__"]


def __getattr__(name):
    if name == "FlasLLM":  # imports vLLM: only when asked for
        from flas_vllm.engine.llm import FlasLLM  # lazy: `import flas_vllm` loads only the core, not the engine

        return FlasLLM
    raise AttributeError(name)
