"""V1 model runner: publish each step's request -> token mapping to the FLAS model.

Wraps `GPUModelRunner._prepare_inputs` (CPUModelRunner inherits it). After
the original runs, `input_batch.req_ids` is in final batch order and
`num_scheduled_tokens` matches it, exactly where LoRA publishes its mapping.

Also wraps `GPUModelRunner._on_request_state_removed` (vLLM's hook for
"request-scoped side caches"), which runs for every finished or aborted request
in `_update_states`, including on the empty step that only carries
`finished_req_ids` and never reaches `_prepare_inputs`. Without it a finished
request would keep its concept slot referenced until the next real step, so
`evict_concepts` right after a `generate` could not evict its concept.
Models without `flas_prepare_step` / `flas_request_finished` are untouched.
"""

from __future__ import annotations

import functools

from . import wrap_once
from .graph_dispatch import attach


def _make(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        model = self.get_model()
        prepare = getattr(model, "flas_prepare_step", None)
        if prepare is not None:
            attach(self)  # before this step's dispatch (graph_dispatch.py)
            num_reqs = self.input_batch.num_reqs
            prepare(self.input_batch.req_ids[:num_reqs], num_scheduled_tokens, self.requests)
        return result

    return _prepare_inputs


def _make_removed(original):
    @functools.wraps(original)
    def _on_request_state_removed(self, req_id, req_state, *args, **kwargs):
        result = original(self, req_id, req_state, *args, **kwargs)
        model = self.get_model() if hasattr(self, "model") else None  # absent before load_model
        finished = getattr(model, "flas_request_finished", None) if model is not None else None
        if finished is not None:
            finished(req_id)
        return result

    return _on_request_state_removed


def install() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # lazy: vllm; patches install only inside vLLM

    done = wrap_once(GPUModelRunner, "_prepare_inputs", _make)
    done |= wrap_once(GPUModelRunner, "_on_request_state_removed", _make_removed)
    return done
