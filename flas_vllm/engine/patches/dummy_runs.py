"""vLLM's dummy batches (memory profiling, warm-up, graph capture) run the flow on every token.

vLLM sizes the KV cache from the peak memory of a profiling run (`profile_run` ->
`_dummy_run`) and warms up / compiles with more dummy runs. Their tokens belong to no
request, so without this patch no token would be steered and the flow's activations
(every Euler step's self-attention, the concept gather) would be left out of the
budget: a fully steered batch at max_num_batched_tokens could then run out of memory.

Wraps `_dummy_run` of both runners: V1's `GPUModelRunner` (CPUModelRunner inherits it),
which calls the model without `_prepare_inputs`, and Model Runner V2's, whose dummy batch
goes through the model state's `prepare_inputs` (model_state.py). Around the original the
model's `flas_profiling()` context steers every token of the batch at the engine's
max_n_steps, on the null concept slot (no concept is encoded or referenced), and leaves
nothing steered when it ends. Models without `flas_profiling` are untouched.
"""

from __future__ import annotations

import contextlib
import functools

from . import wrap_once
from .graph_dispatch import attach


def _make(original):
    @functools.wraps(original)
    def _dummy_run(self, *args, **kwargs):
        model = getattr(self, "model", None)  # absent before load_model
        profiling = getattr(model, "flas_profiling", None) if model is not None else None
        if profiling is not None:
            attach(self)  # before vLLM lists the graphs to capture (graph_dispatch.py)
        with profiling() if profiling is not None else contextlib.nullcontext():
            return original(self, *args, **kwargs)

    return _dummy_run


def install() -> bool:
    # lazy: vllm; patches install only inside vLLM
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    done = wrap_once(GPUModelRunner, "_dummy_run", _make)
    done |= wrap_once(V2ModelRunner, "_dummy_run", _make)
    return done
