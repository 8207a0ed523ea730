"""Benchmarks: vanilla vLLM vs flas-vllm (unsteered, K concepts) vs the transformers path, side by side.

One run measures, on the SAME model, prompts and output lengths (greedy,
`ignore_eos=True`, fixed `max_tokens`):

1. vanilla vLLM Gemma-2 (`vllm.LLM` on the same model directory), and again
   at the KV capacity (tokens) the FLAS engine gets from the same KV memory
   (its flow's paged layers take the rest), which separates capacity from the rest;
2. flas-vllm with every request unsteered;
3. flas-vllm with every request steered, K distinct concepts for each K
   (requests assigned round-robin, flowtimes mixed in [0.5, 2]);
   then mixed traffic: 10% and 50% of the requests steered, the rest not, in
   one batch; the unsteered requests' own TPOT is compared with vanilla's;
4. the transformers path (`HFSteerer`), one concept per batch of <= 16
   prompts, the way the original FLAS code evaluates.

and reports output and total tokens/s, TTFT/TPOT percentiles, each ratio to
(1), the throughput ceiling implied by FLOPs (computed analytically from the
configs), the KV capacity with and without the flow layers, and the latency of
encoding a new concept. Results go to JSON, a markdown table and (when
matplotlib is installed: `pip install flas-vllm[bench]`) a PNG plot.

Only one vLLM engine is alive at a time. Timings are what they are on the
machine at hand; nothing here asserts them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from flas_vllm.bench.config import BenchConfig, parse_ks
from flas_vllm.bench.flops import flops_section
from flas_vllm.bench.models import MODELS, prepare_model
from flas_vllm.bench.report import run_environment, plot, render_markdown, summary_lines
from flas_vllm.bench.results import RunResult
from flas_vllm.bench.rounds import median_runs, round_record, set_ratios
from flas_vllm.bench.runners import engine_process, run_flas, run_hf, run_vanilla, vanilla_kv_bytes_for_tokens
from flas_vllm.bench.workload import build_workload, make_concepts, make_flowtimes

__all__ = ["MODELS", "BenchConfig", "parse_ks", "prepare_model", "build_workload", "make_concepts",
           "make_flowtimes", "run_benchmark"]


# ---------------------------------------------------------------------------
# the whole run

ENGINE_PROCESS_NOTES = {
    "inline": "in the bench's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): each run times the engine's work "
              "and, one after the other, the front end's",
    "separate": "in its own process beside the front end (vLLM's default); on a machine with few cores the two "
                "share them, which adds the same front-end time to every run and pulls every ratio toward 1",
}


def _vanilla_at_flas_kv(cfg: BenchConfig, model, wl, log, vinfo: dict, finfo: dict) -> tuple[list[RunResult], dict]:
    """Vanilla vLLM again, with the KV capacity the FLAS engine got (vLLM's group-aware KV cache size in tokens;
    block counts do not compare across engines whose layers group differently): the unsteered run's cost
    without the capacity the flow's paged layers take. None when asked not to, or when FLAS has no less."""
    vtokens, ftokens = vinfo["kv"].get("group_aware_tokens"), finfo["kv"].get("group_aware_tokens")
    if not cfg.equal_kv_vanilla or not vtokens or not ftokens or ftokens >= vtokens:
        return [], {}
    log(f"[2/3] vanilla vLLM at flas-vllm's KV capacity ({ftokens} tokens) ...")
    run, info = run_vanilla(cfg, model, wl, log, kv_bytes=vanilla_kv_bytes_for_tokens(cfg, vtokens, ftokens))
    return [run], info


def run_benchmark(cfg: BenchConfig, *, log: Callable[[str], None] = print) -> dict:
    """Run every configuration, write bench_<model>[-graph-path].{json,md,png} into cfg.out_dir, return the report."""
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    log(f"preparing model {cfg.model!r} ...")
    model = prepare_model(cfg.model)
    wl = build_workload(model.model_dir, cfg.num_prompts, cfg.max_prompt_tokens)
    env = run_environment(cfg)
    not_measured: list[str] = []
    notes: list[str] = [
        "vanilla vLLM runs with the flas-vllm plugin installed: its patches are active but return early "
        "for a model without FLAS",
        "prefix caching is off in every engine so repeated prompts favour none of them",
        "steered runs encode K fresh concepts inside the timed run (as a new workload would); "
        "'encode s' is that time and output_tok_s_excl_encode in the JSON excludes it",
        "each vLLM engine first runs an untimed warm-up batch (the workload's prompts, 2 output tokens; "
        "half of them steered on the FLAS engine); the transformers path warms up on one batch",
    ]
    if cfg.graph_path and cfg.flow_graphs == "bucketed":
        notes.append("the FLAS engine is forced onto the bucketed graph path (graph_path, flow_graphs=bucketed): "
                     "every step runs the flow as a FULL CUDA graph keyed by its steered bucket would, on its steered "
                     "tokens rounded up to the bucket, graph-safe (full-length concept gather, max Euler steps masked "
                     "per request); without graph replay (CPU) this shows that path's rows, not its launch savings")
    elif cfg.graph_path:
        notes.append("the FLAS engine is forced onto the CUDA-graph-safe flow path (graph_path): the flow runs on "
                     "every token of every step and torch.where keeps unsteered tokens untouched, as in a captured "
                     "CUDA graph; without graph replay (CPU, eager) this shows that path's cost, not its savings")
    elif cfg.flow_graphs == "bucketed":
        notes.append("flow_graphs=bucketed: FULL CUDA graphs keyed by the step's steered bucket; without CUDA graphs "
                     "(CPU) the engine runs the skip path exactly as by default")
    if max(cfg.ks) > cfg.num_prompts:
        notes.append(f"num_prompts={cfg.num_prompts} < max K={max(cfg.ks)}: larger K have fewer concepts in flight")

    rounds, unsteered_x_equal_kv, round_records = [], [], []
    with engine_process(cfg) as env["engine_process"]:
        notes.append(f"each vLLM engine's core runs {env['engine_process']} (--engine-process "
                     f"{cfg.engine_process}): " + ENGINE_PROCESS_NOTES[env["engine_process"]])
        for i in range(cfg.rounds):
            round_of = f" (round {i + 1} of {cfg.rounds})" if cfg.rounds > 1 else ""
            log(f"[1/3] vanilla vLLM{round_of} ...")
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            vanilla, vinfo = run_vanilla(cfg, model, wl, log)
            log(f"[2/3] flas-vllm (unsteered, then K concepts){round_of} ...")
            flas_runs, finfo = run_flas(cfg, model, wl, log)
            equal_kv, einfo = _vanilla_at_flas_kv(cfg, model, wl, log, vinfo, finfo)
            unsteered = next((r for r in flas_runs if r.kind == "flas-unsteered"), None)
            set_ratios([vanilla, *equal_kv, *flas_runs], vanilla, unsteered, equal_kv[0] if equal_kv else None)
            rounds.append([vanilla, *equal_kv, *flas_runs])
            if equal_kv and unsteered is not None:  # what the unsteered run costs with the KV capacity taken out
                unsteered_x_equal_kv.append(unsteered.output_tok_s / equal_kv[0].output_tok_s)
            round_records.append(round_record(rounds[-1], started))
    vanilla, *engine_runs = median_runs(rounds)
    equal_kv, flas_runs = engine_runs[: len(equal_kv)], engine_runs[len(equal_kv):]
    if cfg.rounds > 1:
        notes.append(f"{cfg.rounds} rounds of the vLLM engines, one after another: each ratio is the median of the "
                     "rounds' ratios (each round's own vanilla), tokens/s and latencies the round at the median "
                     "throughput; 'rounds' has every round")
    hf_runs: list[RunResult] = []
    hinfo: dict = {}
    if cfg.hf:
        log("[3/3] transformers path (HFSteerer, one concept per batch) ...")
        hf_runs, hinfo = run_hf(cfg, model, wl, log)
        if hinfo.get("device") == "cpu":
            notes.append(f"transformers path: {hinfo['torch_threads']} torch thread(s), the cores vLLM's CPU "
                         "worker binds (it reserves one core); oversubscribed OpenMP threads slow it badly")
        not_measured.append("transformers path TTFT/TPOT come from forward-hook timestamps (end of the first "
                            "and last forward of each batch), not from vLLM's request stats")
    else:
        not_measured.append("transformers path: skipped (--no-hf)")

    runs = [vanilla, *equal_kv, *flas_runs, *hf_runs]
    unsteered = next((r for r in flas_runs if r.kind == "flas-unsteered"), None)
    set_ratios(hf_runs, vanilla, unsteered, equal_kv[0] if equal_kv else None)  # against the median round's
    if any(r.tpot_ms is None for r in runs) and cfg.output_len < 2:
        not_measured.append("TPOT needs output_len >= 2")
    if any(r.kind != "hf" and r.ttft_ms is None for r in runs):
        not_measured.append("TTFT: RequestOutput.metrics was empty for some vLLM runs")

    kv = {"kv_cache_memory_bytes": cfg.kv_cache_memory_bytes, "vanilla": vinfo["kv"], "flas": finfo["kv"]}
    ratio = {}
    for key in ("blocks_x_block_size_tokens", "group_aware_tokens"):
        a, b = vinfo["kv"].get(key), finfo["kv"].get(key)
        if a and b:
            ratio[key] = round(b / a, 4)
    kv["ratio_flas_to_vanilla"] = ratio
    if equal_kv:
        kv["vanilla_at_flas_kv"] = {**einfo["kv"], "kv_cache_memory_bytes": einfo["kv_cache_memory_bytes"]}
        if unsteered_x_equal_kv:  # the median of the rounds'
            kv["unsteered_x_vanilla_at_flas_kv"] = round(statistics.median(unsteered_x_equal_kv), 4)
    encoding = dict(finfo.get("concept_encoding", {}))
    if hinfo.get("encode_one_concept_ms"):
        encoding["hf_encode_one_concept_ms"] = hinfo["encode_one_concept_ms"]
        encoding["hf_encode_one_concept_mean_ms"] = hinfo["encode_one_concept_mean_ms"]

    report: dict[str, Any] = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
                   "ks": list(cfg.ks), "max_concepts": cfg.max_concepts},
        "environment": env,
        "model": {"name": model.name, "model_dir": str(model.model_dir), "checkpoint_dir": str(model.checkpoint_dir)},
        "workload": {"num_prompts": len(wl.prompts), "prompt_tokens": wl.prompt_tokens,
                     "mean_prompt_tokens": wl.prompt_tokens / len(wl.prompts),
                     "output_len": cfg.output_len, "flowtime_range": [0.5, 2.0], "assignment": "round-robin",
                     "mixed_fractions": list(cfg.mixed_fractions)},
        "engines": {"vanilla": vinfo, "flas": {k: v for k, v in finfo.items() if k != "concept_encoding"},
                    "hf": hinfo, **({"vanilla_at_flas_kv": einfo} if equal_kv else {})},
        "runs": [r.as_dict() for r in runs],
        "ratios": {r.name: {"output_tok_s": r.ratio_output_to_vanilla, "total_tok_s": r.ratio_total_to_vanilla}
                   for r in runs if r is not vanilla},
        "flops": flops_section(model, cfg, wl),
        "kv_capacity": kv,
        "concept_encoding": encoding,
        "not_measured": not_measured,
        "notes": notes,
        **({"rounds": round_records} if cfg.rounds > 1 else {}),
    }
    try:
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    env["total_seconds"] = round(time.perf_counter() - t_start, 1)

    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = cfg.stem
    png = out / f"{stem}.png"
    if cfg.plot:
        why = plot(report, png)
        if why:
            not_measured.append(why)
        else:
            report["files"] = {"png": str(png)}
    report.setdefault("files", {})
    report["files"].update({"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")})
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(report))
    for line in summary_lines(report):
        log(line)
    log("wrote " + ", ".join(report["files"].values()))
    return report
