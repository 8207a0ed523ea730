"""V1 model runner: publish each step's request -> token mapping to the FLAS model.

Wraps `GPUModelRunner._prepare_inputs` (CPUModelRunner inherits it). After
the original runs, `input_batch.req_ids` is in final batch order and
`num_scheduled_tokens` matches it, exactly where LoRA publishes its mapping.
Models without `flas_prepare_step` are untouched.
"""

from __future__ import annotations

import functools

from . import wrap_once


def _make(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        model = self.get_model()
        prepare = getattr(model, "flas_prepare_step", None)
        if prepare is not None:
            num_reqs = self.input_batch.num_reqs
            prepare(self.input_batch.req_ids[:num_reqs], num_scheduled_tokens, self.requests)
        return result

    return _prepare_inputs


def install() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return wrap_once(GPUModelRunner, "_prepare_inputs", _make)
