"""The three contenders, each on the same prompts: vanilla vLLM, flas-vllm, the transformers path."""

from __future__ import annotations


import contextlib
import dataclasses
import gc
import os
import time
from typing import Any, Callable, Iterator, Sequence

from flas_vllm.core.steering import steering
from flas_vllm.engine.llm import shutdown_engine, FlasLLM
from flas_vllm.bench.config import BenchConfig
from flas_vllm.bench.models import BenchModel
from flas_vllm.bench.results import RunResult, to_ms, vllm_latencies, percentiles
from flas_vllm.bench.workload import Workload, assign_round_robin, make_concepts, make_flowtimes, steered_mask


# ---------------------------------------------------------------------------
# engines


def bench_engine_kwargs(cfg: BenchConfig) -> dict:
    return dict(
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        max_model_len=cfg.max_model_len,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        seed=cfg.seed,
        disable_log_stats=False,  # RequestOutput.metrics (TTFT/TPOT) is only filled with stats on
        # Repeated prompts (num_prompts > the instruction pool) must not favour any engine.
        enable_prefix_caching=False,
    )


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def resolved_engine_process(cfg: BenchConfig) -> str:
    """"inline" or "separate": `cfg.engine_process`, "auto" decided by the platform vLLM runs on."""
    if cfg.engine_process != "auto":
        return cfg.engine_process
    from vllm.platforms import current_platform  # lazy: vllm is heavy

    return "inline" if current_platform.is_cpu() else "separate"


@contextlib.contextmanager
def engine_process(cfg: BenchConfig) -> Iterator[str]:
    """The vLLM engines started inside run their core where `cfg` says (vLLM reads the variable when an engine
    starts). On a 2-core CPU VM a separate engine process beside the front end took ~1.8x as long per run as
    the same engine inline, which pulls every ratio toward 1. An inline engine makes vLLM cache its environment
    variables for the rest of the process; the cache is dropped again on the way out (vLLM's own helper for
    isolating environments), so a later engine, or a test, reads the environment as it is then."""
    from vllm import envs  # lazy: vllm is heavy

    mode = resolved_engine_process(cfg)
    saved = os.environ.get(MULTIPROCESSING_ENV)
    os.environ[MULTIPROCESSING_ENV] = "0" if mode == "inline" else "1"
    envs.disable_envs_cache()
    try:
        yield mode
    finally:
        if saved is None:
            os.environ.pop(MULTIPROCESSING_ENV, None)
        else:
            os.environ[MULTIPROCESSING_ENV] = saved
        envs.disable_envs_cache()


def vanilla_kv_bytes_for_tokens(cfg: BenchConfig, vanilla_tokens: int, tokens: int) -> int:
    """The KV cache bytes that give vanilla vLLM a KV cache of `tokens` tokens (vLLM's group-aware size), from
    the size `cfg`'s bytes gave it. vLLM takes whole blocks of c tokens, each of P bytes, so vanilla_tokens =
    floor(bytes / P) * c; the bytes returned give floor(tokens / c) or one block more, never more than one
    block away from `tokens` (for tokens < vanilla_tokens; the run reports what it got)."""
    return -(-tokens * cfg.kv_cache_memory_bytes // vanilla_tokens)


def kv_capacity(llm) -> dict:
    vc = llm.llm_engine.vllm_config
    cc = vc.cache_config
    blocks = int(cc.num_gpu_blocks or 0)
    out = {
        "num_blocks": blocks,
        "block_size": int(cc.block_size),
        "blocks_x_block_size_tokens": blocks * int(cc.block_size),
    }
    size = getattr(cc, "kv_cache_size_tokens", None)
    if size:
        out["group_aware_tokens"] = int(size)  # vLLM's "KV cache size: N tokens" (hybrid groups accounted)
    conc = getattr(cc, "kv_cache_max_concurrency", None)
    if conc:
        out["max_concurrency_at_max_model_len"] = round(float(conc), 3)
    return out


def _sched_info(llm) -> dict:
    sc = llm.llm_engine.vllm_config.scheduler_config
    return {"max_num_seqs": int(sc.max_num_seqs), "max_num_batched_tokens": int(sc.max_num_batched_tokens)}


def _timed_generate(llm, prompts: list[list[int]], params: list) -> tuple[list, float]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def timed_sampling(cfg: BenchConfig, extra=None):
    from vllm import SamplingParams  # lazy: vllm is heavy

    return SamplingParams(temperature=0.0, max_tokens=cfg.output_len, ignore_eos=True, extra_args=extra)


def _warm_prompts(cfg: BenchConfig, wl: Workload) -> list[list[int]]:
    return wl.prompts if cfg.warmup_requests is None else wl.prompts[: cfg.warmup_requests]


def _warm_sampling(cfg: BenchConfig, extra=None):
    from vllm import SamplingParams  # lazy: vllm is heavy

    return SamplingParams(temperature=0.0, max_tokens=min(2, cfg.output_len), ignore_eos=True, extra_args=extra)


def warm_up(llm, cfg: BenchConfig, wl: Workload, *, steered: bool = False) -> None:
    """The untimed warm-up batch every engine runs first (2 output tokens each); on a FLAS engine (`steered`)
    both code paths: every other request steered toward one of two concepts no timed run uses."""
    warm = _warm_prompts(cfg, wl)
    if not warm:
        return
    concepts = make_concepts(2, "warmup")
    _timed_generate(llm, warm, [_warm_sampling(cfg, steering(concepts[i % 2], 1.0) if steered and i % 2 else None)
                                for i in range(len(warm))])


def _vllm_run(name, kind, k, concepts_used, llm, wl: Workload, params, encode_s_fn=None,
              steered: list[bool] | None = None) -> RunResult:
    """One timed batch. `steered` (mixed traffic): which requests are steered; the unsteered ones'
    TPOT is then also reported on its own."""
    before = encode_s_fn() if encode_s_fn else 0.0
    outs, wall = _timed_generate(llm, wl.prompts, params)
    encode_s = (encode_s_fn() - before) if encode_s_fn else 0.0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, tpot, notes = vllm_latencies(outs)
    r = RunResult(name=name, kind=kind, k=k, concepts_used=concepts_used, num_requests=len(outs),
                  prompt_tokens=sum(len(o.prompt_token_ids) for o in outs), output_tokens=out_tokens,
                  wall_s=wall, ttft_ms=ttft, tpot_ms=tpot, encode_s=encode_s, notes=notes)
    if steered is not None:  # LLM.generate returns outputs in request order
        r.steered_requests = sum(steered)
        _, r.unsteered_tpot_ms, _ = vllm_latencies([o for o, s in zip(outs, steered) if not s])
    return r


Log = Callable[[str], None]


VANILLA_AT_FLAS_KV = "vanilla vLLM at flas-vllm's KV capacity"


def run_vanilla(cfg: BenchConfig, model: BenchModel, wl: Workload, log: Log, *, kv_bytes: int | None = None
                ) -> tuple[RunResult, dict]:
    """Vanilla vLLM on the workload; with `kv_bytes`, at that KV cache size instead of `cfg`'s (the run
    named VANILLA_AT_FLAS_KV, kind "vanilla-equal-kv")."""
    from vllm import LLM  # lazy: vllm is heavy

    name, kind = ("vanilla vLLM", "vanilla") if kv_bytes is None else (VANILLA_AT_FLAS_KV, "vanilla-equal-kv")
    kwargs = bench_engine_kwargs(cfg)
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_bytes
    t0 = time.perf_counter()
    llm = LLM(model=str(model.model_dir), **kwargs)
    startup = time.perf_counter() - t0
    try:
        info = {"startup_s": round(startup, 2), "kv": kv_capacity(llm), "scheduler": _sched_info(llm),
                "kv_cache_memory_bytes": kwargs["kv_cache_memory_bytes"]}
        warm_up(llm, cfg, wl)
        log(f"{name}: timed run ...")
        res = _vllm_run(name, kind, None, 0, llm, wl, [timed_sampling(cfg)] * len(wl.prompts))
    finally:
        shutdown_engine(llm)
    return res, info


def run_flas(cfg: BenchConfig, model: BenchModel, wl: Workload, log: Log) -> tuple[list[RunResult], dict]:
    t0 = time.perf_counter()
    llm = FlasLLM(str(model.model_dir), str(model.checkpoint_dir), max_concepts=cfg.max_concepts,
                  graph_path=cfg.graph_path, flow_graphs=cfg.flow_graphs, **bench_engine_kwargs(cfg))
    startup = time.perf_counter() - t0
    results: list[RunResult] = []
    try:
        info = {"startup_s": round(startup, 2), "kv": kv_capacity(llm), "scheduler": _sched_info(llm),
                "max_concepts": cfg.max_concepts, "graph_path": llm.options.graph_path,
                "flow_graphs": llm.options.flow_graphs}

        def encode_s() -> float:
            return float(llm.concept_stats()["encode_seconds"])

        n = len(wl.prompts)
        flowtimes = make_flowtimes(n, cfg.seed)
        warm_up(llm, cfg, wl, steered=True)  # both code paths, concepts never used again

        log("flas-vllm unsteered: timed run ...")
        results.append(_vllm_run("flas-vllm unsteered", "flas-unsteered", 0, 0, llm, wl,
                                 [timed_sampling(cfg)] * n, encode_s))
        for k in cfg.ks:
            concepts = assign_round_robin(n, make_concepts(k, f"k{k}"))
            params = [timed_sampling(cfg, steering(c, t)) for c, t in zip(concepts, flowtimes)]
            log(f"flas-vllm steered, K={k}: timed run ...")
            r = _vllm_run(f"flas-vllm K={k}", "flas-steered", k, len(set(concepts)), llm, wl, params, encode_s)
            if k > n:
                r.notes.append(f"only {n} requests: {len(set(concepts))} of the K={k} concepts are used")
            seqs = info["scheduler"]["max_num_seqs"]
            if min(k, n) > seqs:
                r.notes.append(f"at most max_num_seqs={seqs} requests (so concepts) run at once")
            results.append(r)
        for fraction in cfg.mixed_fractions:
            mask = steered_mask(n, fraction)
            k = min(max(cfg.ks), sum(mask))
            concepts = iter(assign_round_robin(sum(mask), make_concepts(k, f"mix{fraction}")))
            params = [timed_sampling(cfg, steering(next(concepts), t) if s else None) for s, t in zip(mask, flowtimes)]
            name = f"flas-vllm mixed {round(100 * fraction)}% steered"
            log(f"{name} (K={k}): timed run ...")
            results.append(_vllm_run(name, "flas-mixed", k, k, llm, wl, params, encode_s, steered=mask))
        info["concept_encoding"] = _probe_encoding(llm, cfg, wl.prompts[0])
    finally:
        shutdown_engine(llm)
    return results, info


def _probe_encoding(llm, cfg: BenchConfig, flush_prompt: list[int]) -> dict:
    """Latency of encoding a new concept: engine counters, and preload_concepts() of fresh ones (RPC included)."""
    # A finished request's concept slot is released at the NEXT engine step: one tiny unsteered
    # request frees the last run's slots, so the probes below find room without waiting.
    from vllm import SamplingParams  # lazy: vllm is heavy

    llm.generate([{"prompt_token_ids": flush_prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    stats = llm.concept_stats()
    out: dict[str, Any] = {
        "engine_encoded": int(stats["encoded"]),
        "engine_encode_seconds": float(stats["encode_seconds"]),
    }
    if stats["encoded"]:
        out["engine_mean_encode_ms"] = round(1000.0 * stats["encode_seconds"] / stats["encoded"], 3)
    probes = make_concepts(cfg.encode_probe_concepts, "probe")
    one_by_one = []
    for c in probes:
        t0 = time.perf_counter()
        llm.preload_concepts([c])
        one_by_one.append(time.perf_counter() - t0)
    llm.evict_concepts(probes)
    if one_by_one:
        out["preload_one_concept_ms"] = to_ms(percentiles(one_by_one))
        out["preload_one_concept_mean_ms"] = round(1000.0 * sum(one_by_one) / len(one_by_one), 3)
    batch = make_concepts(cfg.encode_probe_concepts, "probe-batch")
    if batch:
        t0 = time.perf_counter()
        llm.preload_concepts(batch)
        dt = time.perf_counter() - t0
        llm.evict_concepts(batch)
        out["preload_batch"] = {"concepts": len(batch), "seconds": round(dt, 4),
                                "per_concept_ms": round(1000.0 * dt / len(batch), 3)}
    return out


# ---------------------------------------------------------------------------
# the transformers path


def hf_batches(concepts: Sequence[str], batch_size: int) -> list[tuple[str, list[int]]]:
    """One concept per batch of <= batch_size requests (request indices), concepts in first-seen order."""
    by_concept: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by_concept.setdefault(c, []).append(i)
    out = []
    for c, idx in by_concept.items():
        for s in range(0, len(idx), batch_size):
            out.append((c, idx[s:s + batch_size]))
    return out


def run_hf(cfg: BenchConfig, model: BenchModel, wl: Workload, log: Log) -> tuple[list[RunResult], dict]:
    import torch  # lazy: torch is heavy

    from flas_vllm.reference.hf import HFSteerer  # lazy: torch, via reference.hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.dtype) if cfg.dtype not in ("auto",) else torch.float32
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(cfg.hf_threads or max(1, usable_cpu_count() - 1))
    t0 = time.perf_counter()
    steerer = HFSteerer.from_pretrained(model.model_dir, str(model.checkpoint_dir), dtype=dtype, device=device)
    info: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2), "device": device,
                            "torch_threads": torch.get_num_threads(), "batch_size": cfg.hf_batch_size}

    n = len(wl.prompts) if cfg.hf_max_prompts is None else min(len(wl.prompts), cfg.hf_max_prompts)
    prompts = wl.prompts[:n]
    flowtimes = make_flowtimes(len(wl.prompts), cfg.seed)[:n]

    stamps: list[float] = []

    def stamp(module, args, output):  # end of every forward = one token for every row of the batch
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    handle = steerer.model.register_forward_hook(stamp)
    results: list[RunResult] = []
    seen: dict[tuple[int, ...], RunResult] = {}
    try:
        warm = prompts[: max(1, min(cfg.warmup_requests or cfg.hf_batch_size, cfg.hf_batch_size, n))]
        steerer.generate(warm, make_concepts(1, "hf-warmup")[0], 1.0, max_new_tokens=min(2, cfg.output_len),
                         ignore_eos=True)
        for k in cfg.ks:
            concepts = assign_round_robin(n, make_concepts(k, f"hf-k{k}"))
            batches = hf_batches(concepts, cfg.hf_batch_size)
            structure = tuple(sorted(len(b) for _, b in batches))
            if structure in seen:  # identical batch shapes: same work, not run again
                prev = seen[structure]
                r = dataclasses.replace(prev, name=f"transformers K={k}", k=k, concepts_used=len(set(concepts)),
                                        reused_from_k=prev.k, notes=list(prev.notes))
                r.notes.append(f"same batch structure as K={prev.k} ({len(batches)} batches): measurement reused")
                results.append(r)
                continue
            log(f"transformers path, K={k}: {len(batches)} batches ...")
            ttft, tpot, out_tokens = [], [], 0
            enc_before = 0.0
            run_start = time.perf_counter()
            for concept, idx in batches:
                stamps.clear()
                e0 = time.perf_counter()
                steerer.concept_kv(concept)  # encode (timed separately; generate() would do it anyway)
                enc_before += time.perf_counter() - e0
                gens = steerer.generate([prompts[i] for i in idx], concept, [flowtimes[i] for i in idx],
                                        max_new_tokens=cfg.output_len, ignore_eos=True)
                out_tokens += sum(len(g.token_ids) for g in gens)
                if stamps:
                    ttft += [stamps[0] - run_start] * len(idx)  # every request arrived at run_start
                    if len(stamps) > 1:
                        tpot += [(stamps[-1] - stamps[0]) / (len(stamps) - 1)] * len(idx)
            wall = time.perf_counter() - run_start
            r = RunResult(name=f"transformers K={k}", kind="hf", k=k, concepts_used=len(set(concepts)),
                          num_requests=n, prompt_tokens=sum(len(p) for p in prompts), output_tokens=out_tokens,
                          wall_s=wall, ttft_ms=to_ms(percentiles(ttft)), tpot_ms=to_ms(percentiles(tpot)),
                          encode_s=enc_before, batches=len(batches))
            if n < len(wl.prompts):
                r.notes.append(f"transformers path capped at {n} of {len(wl.prompts)} prompts (hf_max_prompts)")
            seen[structure] = r
            results.append(r)
        # latency of encoding a fresh concept on this path
        lat = []
        for c in make_concepts(cfg.encode_probe_concepts, "hf-probe"):
            t1 = time.perf_counter()
            steerer.concept_kv(c)
            lat.append(time.perf_counter() - t1)
        if lat:
            info["encode_one_concept_ms"] = to_ms(percentiles(lat))
            info["encode_one_concept_mean_ms"] = round(1000.0 * sum(lat) / len(lat), 3)
    finally:
        handle.remove()
        torch.set_num_threads(old_threads)
        del steerer
        gc.collect()
    return results, info


def usable_cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


