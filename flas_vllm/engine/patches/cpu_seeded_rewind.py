"""CPU: a seeded request whose prompt is prefilled in chunks must not kill the engine.

After sampling, `GPUModelRunner._bookkeeping_sync` "rewinds" the generator of
each request whose sampled token is discarded (a partial prefill chunk) with
`gen.set_offset(gen.get_offset() - 4)`: a detail of CUDA's Philox generator.
CPU generators (mt19937) have no offset and raise "CPU Generator does not use
offset", which kills vLLM 0.32's engine core on CPU (CPUModelRunner inherits
the method) the first time a request with a `seed` is chunk-prefilled. Bulk
generation seeds every request, so any run with long prompts or a full step
budget hit it. Same bug class as vllm-rbln PR #1025 (which skips the rewind).

Here the rewind is exact instead: the state of every CPU generator whose token
will be discarded is saved before `_sample` and restored right after it ("as if
not sampled", what the CUDA rewind means), and those generators are hidden from
the offset loop in `_bookkeeping_sync`. CUDA generators are left to vLLM.
"""

from __future__ import annotations

import functools

import numpy as np

from . import wrap_once


def _discarded_cpu_generators(runner) -> dict:
    batch = runner.input_batch
    if not batch.generators:
        return {}
    discarded = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
    found = {}
    for i in discarded:
        gen = batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            found[int(i)] = gen
    return found


def _make_sample(original):
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        gens = _discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in gens.items()}
        out = original(self, *args, **kwargs)
        for i, g in gens.items():
            g.set_state(states[i])
        return out

    return _sample


def _make_bookkeeping(original):
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        gens = _discarded_cpu_generators(self)
        for i in gens:  # already rewound exactly in _sample; the offset API would raise
            del self.input_batch.generators[i]
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(gens)

    return _bookkeeping_sync


def install() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # lazy: vllm; patches install only inside vLLM

    done = wrap_once(GPUModelRunner, "_sample", _make_sample)
    done |= wrap_once(GPUModelRunner, "_bookkeeping_sync", _make_bookkeeping)
    return done
