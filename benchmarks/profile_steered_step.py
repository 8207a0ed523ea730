"""Where does a steered step spend its time? bench-2b-shape in an in-process engine, timers around the flow.

    python benchmarks/profile_steered_step.py [K=64] [NUM_PROMPTS=256] [--profile]

Prints wall time, model-forward time and the flow's share for unsteered, K=1 and K
steered runs and mixed runs (10% and 50% steered; 32 greedy tokens each); --profile adds a
torch profiler table of one steered run. A diagnostic, not a benchmark: `flas-vllm bench` gives the ratios.
"""
import os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

def main():
    import torch
    from vllm import SamplingParams
    from flas_vllm import bench
    from flas_vllm.bench.workload import steered_mask
    from flas_vllm.engine.llm import FlasLLM
    from flas_vllm.core.steering import steering
    from flas_vllm.engine import model as fm

    k = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    out_len = 32
    m = bench.prepare_model("bench-2b-shape")
    wl = bench.build_workload(m.model_dir, n, 192)
    llm = FlasLLM(str(m.model_dir), str(m.checkpoint_dir), max_concepts=max(k, 8), dtype="float32",
                  enforce_eager=True, max_model_len=1024, kv_cache_memory_bytes=512 * 1024 * 1024,
                  enable_prefix_caching=False)
    acc = {"steer": 0.0, "steer_calls": 0, "fwd": 0.0, "prep": 0.0, "rows": 0, "tokens": 0}
    from vllm.model_executor.models.gemma2 import Gemma2Model
    orig_steer = fm.FlasSteer.steer_into
    def steer(self, *a):
        t = time.perf_counter(); out = orig_steer(self, *a)
        acc["steer"] += time.perf_counter() - t; acc["steer_calls"] += 1
        acc["rows"] += self.state.flow_rows if self.state.any_steered else 0; acc["tokens"] += a[1].shape[0]
        return out
    fm.FlasSteer.steer_into = steer
    orig_fwd = Gemma2Model.forward
    def fwd(self, *a, **kw):
        t = time.perf_counter(); r = orig_fwd(self, *a, **kw); acc["fwd"] += time.perf_counter() - t; return r
    Gemma2Model.forward = fwd
    orig_prep = fm.FlasCausalLMMixin.flas_prepare_step
    def prep(self, *a):
        t = time.perf_counter(); orig_prep(self, *a); acc["prep"] += time.perf_counter() - t
    fm.FlasCausalLMMixin.flas_prepare_step = prep

    def run(params, label):
        for key in acc: acc[key] = 0
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{label}: wall {wall:.2f}s, {toks/wall:.1f} out tok/s; model fwd {acc['fwd']:.2f}s "
              f"(flow {acc['steer']:.2f}s over {acc['steer_calls']} calls, {acc['rows']} of {acc['tokens']} "
              f"token rows), prepare_step {acc['prep']:.3f}s, "
              f"outside fwd {wall-acc['fwd']:.2f}s", flush=True)

    flow = bench.make_flowtimes(n, 0)
    warm = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                           extra_args=steering("warm", 1.0) if i % 2 else None) for i in range(n)]
    llm.generate([{"prompt_token_ids": p} for p in wl.prompts], warm, use_tqdm=False)
    sp = lambda extra=None: SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, extra_args=extra)
    run([sp()] * n, "unsteered")
    for kk in (1, k):
        cs = bench.make_concepts(kk, f"p{kk}")
        run([sp(steering(cs[i % kk], flow[i])) for i in range(n)], f"steered K={kk}")
    for fraction in (0.1, 0.5):  # mixed traffic: the flow on the steered rows only, its per-call cost
        mask, cs = steered_mask(n, fraction), bench.make_concepts(k, f"m{fraction}")
        run([sp(steering(cs[i % k], flow[i]) if m else None) for i, m in enumerate(mask)],
            f"mixed {fraction:.0%} steered")
    if "--profile" in sys.argv:
        cs = bench.make_concepts(k, "prof")
        params = [sp(steering(cs[i % k], flow[i])) for i in range(n)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

if __name__ == "__main__":
    main()
