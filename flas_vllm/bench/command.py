"""`flas-vllm bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flas_vllm.bench import MODELS, BenchConfig, parse_ks, run_benchmark


def bench(
    model: str = typer.Option("fixture", help="fixture (tiny trained Gemma-2), bench-2b-shape or "
                                              "bench-qwen3-8b-shape (real proportions, narrow, random weights)"),
    ks: str = typer.Option("1,8,64,256,1024", help="numbers of distinct concepts K, comma-separated"),
    num_prompts: Optional[int] = typer.Option(None, min=1, help="requests per run (default: the largest K)"),
    output_len: int = typer.Option(32, min=1, help="output tokens per request (ignore_eos, greedy)"),
    out: Path = typer.Option(Path("benchmarks/results"),
                             help="directory for bench_<model>[-graph-path].{json,md,png}"),
    compile: bool = typer.Option(False, "--compile/--eager", help="use vLLM's default compilation"),
    dtype: str = typer.Option("float32", help="model dtype for every path"),
    kv_cache_mib: int = typer.Option(512, min=16, help="KV cache size in MiB (same for every engine)"),
    max_model_len: int = typer.Option(1024, min=64, help="context length of the vLLM engines"),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="also run the transformers path (one concept per batch)"),
    hf_max_prompts: Optional[int] = typer.Option(None, min=1, help="cap the transformers path's prompts"),
    mixed: str = typer.Option("0.1,0.5", help="mixed-traffic runs: fractions of requests steered, comma-separated "
                                              "('' for none)"),
    graph_path: bool = typer.Option(False, "--graph-path",
                                    help="force the FLAS engine onto the CUDA-graph-safe flow path (flow on every "
                                         "token); results go to bench_<model>-graph-path.*"),
    flow_graphs: str = typer.Option("traced", "--flow-graphs",
                                     help="what FULL CUDA graphs (and --graph-path steps) run of the flow: traced "
                                          "(every token) or bucketed (each step's steered bucket); bucketed results "
                                          "go to bench_<model>[-graph-path]-bucketed.*"),
    engine_process: str = typer.Option("auto", "--engine-process",
                                        help="where each vLLM engine's core runs: inline (this process), separate "
                                             "(vLLM's default) or auto (inline on CPU, separate on GPUs)"),
    equal_kv: bool = typer.Option(True, "--equal-kv/--no-equal-kv",
                                  help="also run vanilla vLLM at the FLAS engine's KV capacity"),
    rounds: int = typer.Option(1, min=1, help="run the vLLM engines' whole sequence this many times, one round "
                                              "after another; the report keeps each ratio's median and every round"),
) -> None:
    """Throughput and latency: vanilla vLLM vs flas-vllm (unsteered, K concepts) vs the transformers path."""
    if model not in MODELS:
        raise typer.BadParameter(f"must be one of {', '.join(MODELS)}", param_hint="--model")
    try:
        k_list = parse_ks(ks)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ks") from exc
    try:
        fractions = [float(x) for x in mixed.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated fractions, got {mixed!r}", param_hint="--mixed") from exc
    cfg = BenchConfig(model=model, ks=k_list, num_prompts=num_prompts, output_len=output_len, out_dir=out,
                      enforce_eager=not compile, dtype=dtype, kv_cache_memory_bytes=kv_cache_mib * 1024 * 1024,
                      max_model_len=max_model_len, hf=hf, hf_max_prompts=hf_max_prompts, mixed_fractions=fractions,
                      graph_path=graph_path, flow_graphs=flow_graphs, engine_process=engine_process,
                      equal_kv_vanilla=equal_kv, rounds=rounds)
    try:
        cfg = cfg.resolved()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_benchmark(cfg, log=typer.echo)
