"""Is flas-vllm, every request unsteered, slower than vanilla vLLM with the same KV capacity? An interleaved A/B.

`flas-vllm bench` runs vanilla at the FLAS engine's KV capacity once, minutes after the unsteered run, so
drift on a shared machine moves that one ratio by several percent. Here the two engines take turns, each in
a fresh process built as the bench builds it (same workload, KV memory, stats, warm-up), for --rounds rounds
of --runs timed runs each, and the script prints every wall time and the ratio of the medians (a FLAS
engine's warm-up steers half its requests, as the bench's does). Vanilla gets the KV memory that gives it
the FLAS engine's capacity (vLLM's group-aware KV cache size in tokens), found by starting each engine once
first.

    python benchmarks/kv_capacity_ab.py                                  # bench-2b-shape, 256 prompts, 2 rounds x 3 runs
    python benchmarks/kv_capacity_ab.py --model fixture --num-prompts 8 --rounds 1 --runs 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _engine(role: str, args, kv_bytes: int):
    # lazy, here and below: a parent process starts no engine and needs none of vLLM
    from flas_vllm import bench
    from flas_vllm.bench.config import BenchConfig
    from flas_vllm.bench.runners import bench_engine_kwargs  # one definition of the bench's engine settings
    from flas_vllm.engine.llm import FlasLLM

    cfg = BenchConfig(model=args.model, num_prompts=args.num_prompts, output_len=args.output_len, ks=[1],
                      kv_cache_memory_bytes=kv_bytes).resolved()
    model = bench.prepare_model(args.model)
    kwargs = bench_engine_kwargs(cfg)
    if role == "flas":
        return (FlasLLM(str(model.model_dir), str(model.checkpoint_dir), max_concepts=cfg.max_concepts, **kwargs),
                model, cfg)
    from vllm import LLM  # lazy: vllm is heavy

    return LLM(model=str(model.model_dir), **kwargs), model, cfg


def child(args) -> None:
    """One engine in this process: its KV capacity and, unless probing, the wall time of each timed run."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine inline, as the bench runs it on CPU
    # lazy: after the variable above is set
    from flas_vllm import bench
    from flas_vllm.bench.runners import kv_capacity, timed_sampling, warm_up

    llm, model, cfg = _engine(args.role, args, args.kv_bytes)
    inner = getattr(llm, "llm", llm)
    out = {"role": args.role, "kv_bytes": args.kv_bytes, "kv_tokens": kv_capacity(inner)["group_aware_tokens"],
           "walls": []}
    if not args.probe:
        wl = bench.build_workload(model.model_dir, cfg.num_prompts, cfg.max_prompt_tokens)
        warm_up(llm, cfg, wl, steered=args.role == "flas")  # as the bench's
        prompts = [{"prompt_token_ids": p} for p in wl.prompts]
        for _ in range(args.runs):
            t = time.perf_counter()
            llm.generate(prompts, [timed_sampling(cfg)] * len(prompts), use_tqdm=False)
            out["walls"].append(round(time.perf_counter() - t, 4))
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(args, role: str, kv_bytes: int, probe: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--kv-bytes", str(kv_bytes), "--model", args.model,
           "--num-prompts", str(args.num_prompts), "--output-len", str(args.output_len), "--runs", str(args.runs)]
    try:
        proc = subprocess.run(cmd + (["--probe"] if probe else []), capture_output=True, text=True,
                              timeout=args.child_timeout)
    except subprocess.TimeoutExpired as err:  # a hung engine fails the run by name, not the whole session
        raise RuntimeError(f"{role} engine did not finish within --child-timeout={args.child_timeout} s "
                           f"(killed):\n{(err.stderr or b'')[-3000:]!r}") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{role} engine failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench-2b-shape")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed runs per engine per round")
    p.add_argument("--child-timeout", type=int, default=1800, help="seconds an engine process may take")
    p.add_argument("--json", default=None)
    p.add_argument("--child", dest="role", choices=("flas", "vanilla"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--kv-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_prompts", "output_len", "kv_cache_mib", "rounds", "runs", "child_timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.role is not None:
        child(args)
        return {}
    # lazy: vLLM is heavy, and the parent only needs the bench's arithmetic
    from flas_vllm.bench.runners import vanilla_kv_bytes_for_tokens
    from flas_vllm.bench.config import BenchConfig

    budget = args.kv_cache_mib << 20
    vanilla_tokens = _run_child(args, "vanilla", budget, probe=True)["kv_tokens"]
    flas_tokens = _run_child(args, "flas", budget, probe=True)["kv_tokens"]
    vanilla_bytes = vanilla_kv_bytes_for_tokens(BenchConfig(kv_cache_memory_bytes=budget), vanilla_tokens,
                                                flas_tokens) if flas_tokens < vanilla_tokens else budget
    rounds = []
    for r in range(args.rounds):
        pair = {}
        for role, kv in (("flas", budget), ("vanilla", vanilla_bytes)):
            pair[role] = _run_child(args, role, kv)
            print(f"round {r + 1}: {role:7s} KV {pair[role]['kv_tokens']} tokens, wall s "
                  + " ".join(f"{w:.2f}" for w in pair[role]["walls"]), flush=True)
        rounds.append(pair)
    walls = {role: [w for pair in rounds for w in pair[role]["walls"]] for role in ("flas", "vanilla")}
    ratio = statistics.median(walls["vanilla"]) / statistics.median(walls["flas"])
    report = {"model": args.model, "num_prompts": args.num_prompts, "output_len": args.output_len,
              "kv_cache_memory_bytes": budget, "vanilla_tokens_at_budget": vanilla_tokens,
              "flas_tokens": flas_tokens, "vanilla_kv_bytes": vanilla_bytes, "rounds": rounds,
              "flas_unsteered_x_vanilla_same_kv": round(ratio, 4),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"flas-vllm unsteered x vanilla at the same KV capacity ({flas_tokens} tokens; vanilla has "
          f"{vanilla_tokens} at {args.kv_cache_mib} MiB): {ratio:.3f} (ratio of median walls, "
          f"{len(walls['flas'])} runs each, interleaved)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
