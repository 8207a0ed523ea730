"""Benchmarks: vanilla vLLM vs flas-vllm (unsteered, K concepts) vs the transformers path, side by side.

One run measures, on the SAME model, prompts and output lengths (greedy,
`ignore_eos=True`, fixed `max_tokens`):

1. vanilla vLLM Gemma-2 (`vllm.LLM` on the same model directory);
2. flas-vllm with every request unsteered;
3. flas-vllm with every request steered, K distinct concepts for each K
   (requests assigned round-robin, flowtimes mixed in [0.5, 2]);
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
import gc
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from flas_vllm.llm import shutdown_engine

MODELS = ("fixture", "bench-2b-shape", "bench-qwen3-8b-shape")
DEFAULT_KS = (1, 8, 64, 256, 1024)
DEFAULT_OUT = Path("benchmarks/results")
MIB = 1024 * 1024

# Gemma-2-2B's proportions (26 layers, FLAS after layer 20, sliding/full alternating,
# soft-caps, query_pre_attn_scalar = head_dim as in 2B), scaled down in width so it
# runs in minutes on a CPU. The vocabulary is the fixture tokenizer's (1536 tokens),
# so the LM head is far smaller relative to the layers than in the real 2B (256k vocab);
# `flops` in the report also gives the analytic numbers for the real 2B dimensions.
BENCH_2B_SHAPE_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 64,
    "sliding_window": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 13,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "dtype": "float32",
}
BENCH_2B_SHAPE_FLAS = {"num_blocks": 1, "layer": 20, "n_steps": 3}
# Qwen3-8B's proportions (36 full-attention layers, FLAS after layer 20, 4:1 GQA, head_dim 128
# wider than hidden/heads, plain norms, theta 1e6, untied head), scaled down in width; the
# checkpoint follows the recipe of the non-Gemma-2 releases (one block, no self-attention).
BENCH_QWEN3_8B_SHAPE_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 36,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
    "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False, "attention_dropout": 0.0, "dtype": "float32",
}
BENCH_QWEN3_8B_SHAPE_FLAS = {"num_blocks": 1, "layer": 20, "n_steps": 3, "disable_self_attn": True}
# shaped model -> (fixture family giving the tokenizer, transformers class prefix, config, checkpoint variant)
SHAPED_MODELS: dict[str, tuple[str, str, dict, dict]] = {
    "bench-2b-shape": ("gemma2", "Gemma2", BENCH_2B_SHAPE_CONFIG, BENCH_2B_SHAPE_FLAS),
    "bench-qwen3-8b-shape": ("qwen3", "Qwen3", BENCH_QWEN3_8B_SHAPE_CONFIG, BENCH_QWEN3_8B_SHAPE_FLAS),
}
FIXTURE_FLAS = {"num_blocks": 1}  # layer 2, n_steps 3 (make_random_flas_checkpoint's defaults)

# The real google/gemma-2-2b-it dimensions, for the analytic FLOPs ceiling only.
GEMMA2_2B_DIMS: dict[str, Any] = {
    "model_type": "gemma2",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
    "sliding_window": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 13,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
}


# ---------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    model: str = "fixture"  # one of MODELS
    ks: Sequence[int] = DEFAULT_KS
    num_prompts: int | None = None  # default: max(ks), so every K really has K concepts in flight
    output_len: int = 32
    out_dir: Path = DEFAULT_OUT
    enforce_eager: bool = True
    dtype: str = "float32"
    kv_cache_memory_bytes: int = 512 * MIB
    max_model_len: int = 1024
    max_prompt_tokens: int = 192  # longer AlpacaEval instructions are skipped
    hf: bool = True  # run the transformers path
    hf_batch_size: int = 16
    hf_max_prompts: int | None = None  # cap the (slow) transformers path; None = the same prompts as vLLM
    # torch threads for the transformers path on CPU; None = what vLLM's CPU worker binds
    # (all cores but one it reserves, at least 1), so both paths get the same cores
    hf_threads: int | None = None
    # untimed warm-up batch per engine, 2 output tokens each: None = every prompt of the workload
    # (covers the batch shapes of the timed runs)
    warmup_requests: int | None = None
    encode_probe_concepts: int = 8
    seed: int = 0
    plot: bool = True

    def resolved(self) -> "BenchConfig":
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        ks = sorted({int(k) for k in self.ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {list(self.ks)}")
        n = self.num_prompts if self.num_prompts is not None else max(ks)
        if n < 1 or self.output_len < 1:
            raise ValueError("num_prompts and output_len must be >= 1")
        return dataclasses.replace(self, ks=ks, num_prompts=n, out_dir=Path(self.out_dir))

    @property
    def max_concepts(self) -> int:
        # >= max K so nothing waits for a slot; room for the warm-up and encode probes too
        return max(max(self.ks), self.encode_probe_concepts, 2)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc
    if not ks or min(ks) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return ks


# ---------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_dir: Path
    checkpoint_dir: Path


def prepare_model(name: str) -> BenchModel:
    """Build (or reuse from the cache) the model and a random FLAS checkpoint for it."""
    from flas_vllm.fixture_checkpoints import ensure_flas_checkpoint
    from flas_vllm.fixtures import ensure_tiny_gemma2

    fixture = ensure_tiny_gemma2()
    if name == "fixture":
        return BenchModel(name, fixture, ensure_flas_checkpoint(fixture, **FIXTURE_FLAS))
    if name in SHAPED_MODELS:
        from flas_vllm.family_fixtures import ensure_family_model

        family, _, _, variant = SHAPED_MODELS[name]
        model_dir = ensure_bench_shape(name, ensure_family_model(family))
        return BenchModel(name, model_dir, ensure_flas_checkpoint(model_dir, **variant))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _bench_key(name: str, fixture_dir: Path) -> str:
    import hashlib

    try:
        fixture_key = json.loads((fixture_dir / ".flas_fixture.json").read_text()).get("key", "")
    except (OSError, ValueError):
        fixture_key = ""
    blob = json.dumps({"config": SHAPED_MODELS[name][2], "fixture": fixture_key, "seed": 0, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_bench_shape(name: str, fixture_dir: Path) -> Path:
    """A real model's proportions with random weights (no training), cached; tokenizer from the fixture."""
    from flas_vllm.fixtures import _file_lock, fixture_cache_dir

    key = _bench_key(name, fixture_dir)
    cache = fixture_cache_dir()
    out = cache / f"{name}-{key}"
    if (out / ".complete").exists():
        return out
    with _file_lock(cache / f".{name}.lock"):
        if (out / ".complete").exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache))
        try:
            build_bench_shape(name, tmp, fixture_dir)
            (tmp / ".complete").write_text(json.dumps({"key": key}) + "\n")
            os.chmod(tmp, 0o755)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def build_bench_shape(name: str, out_dir: Path, fixture_dir: Path, *, seed: int = 0) -> Path:
    import torch
    import transformers

    from flas_vllm.fixtures import _save_model

    _, prefix, config, _ = SHAPED_MODELS[name]
    fixture_cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg = dict(config)
    for k in ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id"):
        if k in fixture_cfg:
            cfg[k] = fixture_cfg[k]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    model = model_cls(getattr(transformers, f"{prefix}Config")(**cfg)).to(torch.float32).eval()
    _save_model(model, out_dir)  # safetensors, float32
    # tokenizer, chat template and generation config from the fixture (written after
    # save_pretrained, which writes its own generation_config.json)
    skip = {"config.json", "model.safetensors", ".flas_fixture.json"}
    for f in fixture_dir.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out_dir / f.name)
    return out_dir


# ---------------------------------------------------------------------------
# workload


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids (chat-formatted, <bos> included)
    texts: list[str]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def build_workload(model_dir: Path, n: int, max_prompt_tokens: int, prompt_format: str = "chat") -> Workload:
    """The first AlpacaEval instructions (cycled when more are needed) as token ids."""
    from transformers import AutoTokenizer

    from flas_vllm.fixtures import _load_alpaca
    from flas_vllm.prompts import format_prompt

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pool: list[tuple[str, list[int]]] = []
    for row in _load_alpaca():
        ids = format_prompt(tok, row["instruction"], prompt_format)
        if len(ids) <= max_prompt_tokens:
            pool.append((row["instruction"], ids))
    if not pool:
        raise ValueError(f"no AlpacaEval instruction fits in {max_prompt_tokens} tokens")
    picked = [pool[i % len(pool)] for i in range(n)]
    return Workload(prompts=[p for _, p in picked], texts=[t for t, _ in picked])


def concept_pool() -> list[str]:
    from importlib import resources

    try:
        text = resources.files("flas_vllm.data").joinpath("concept500_2b_l20_metadata.jsonl").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # a bare checkout
        text = (Path(__file__).parent / "data" / "concept500_2b_l20_metadata.jsonl").read_text("utf-8")
    return [json.loads(line)["concept"] for line in text.splitlines() if line.strip()]


def make_concepts(k: int, tag: str) -> list[str]:
    """K distinct concept strings (AxBench Concept500 phrases), unique per `tag` so each run encodes fresh ones."""
    pool = concept_pool()
    return [f"{pool[i % len(pool)]} ({tag}-{i})" for i in range(k)]


def make_flowtimes(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.5, 2.0), 3) for _ in range(n)]


def assign_round_robin(n: int, concepts: Sequence[str]) -> list[str]:
    return [concepts[i % len(concepts)] for i in range(n)]


# ---------------------------------------------------------------------------
# statistics


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float] | None:
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    out = {}
    for q in qs:
        pos = (len(vals) - 1) * q / 100.0  # linear interpolation, as numpy's default
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{q}"] = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
    return out


def _ms(p: dict[str, float] | None) -> dict[str, float] | None:
    return None if p is None else {k: round(v * 1000.0, 3) for k, v in p.items()}


@dataclass
class RunResult:
    name: str
    kind: str  # vanilla | flas-unsteered | flas-steered | hf
    k: int | None
    concepts_used: int
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    ttft_ms: dict[str, float] | None = None
    tpot_ms: dict[str, float] | None = None
    encode_s: float = 0.0  # concept encoding done inside the timed run
    batches: int | None = None  # transformers path only
    reused_from_k: int | None = None  # transformers path: same batch structure as that K, not re-run
    notes: list[str] = field(default_factory=list)
    ratio_output_to_vanilla: float | None = None
    ratio_total_to_vanilla: float | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tok_s"] = round(self.output_tok_s, 3)
        d["total_tok_s"] = round(self.total_tok_s, 3)
        d["wall_s"] = round(self.wall_s, 4)
        d["encode_s"] = round(self.encode_s, 4)
        if self.encode_s > 0 and self.wall_s > self.encode_s:
            d["output_tok_s_excl_encode"] = round(self.output_tokens / (self.wall_s - self.encode_s), 3)
        return d


def _vllm_latencies(outputs) -> tuple[dict | None, dict | None, list[str]]:
    """TTFT and TPOT from RequestOutput.metrics (vLLM's RequestStateStats, needs disable_log_stats=False).

    TTFT = first_token_latency (first output minus arrival: in an offline batch every
    request arrives at the start, so queueing is included); TPOT = (last_token_ts -
    first_token_ts) / (n - 1), engine-core timestamps.
    """
    ttft, tpot = [], []
    for o in outputs:
        m = getattr(o, "metrics", None)
        if m is None:
            continue
        if getattr(m, "first_token_latency", 0.0) > 0:
            ttft.append(m.first_token_latency)
        n = getattr(m, "num_generation_tokens", 0)
        first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
        if n > 1 and first > 0 and last >= first:
            tpot.append((last - first) / (n - 1))
    notes = []
    if not ttft:
        notes.append("TTFT not measured: RequestOutput.metrics missing (vLLM stats disabled?)")
    if not tpot:
        notes.append("TPOT not measured (needs >= 2 output tokens and RequestOutput.metrics)")
    return _ms(percentiles(ttft)), _ms(percentiles(tpot)), notes


# ---------------------------------------------------------------------------
# engines


def _engine_kwargs(cfg: BenchConfig) -> dict:
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


def _kv_capacity(llm) -> dict:
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


def _sampling(cfg: BenchConfig, extra=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=cfg.output_len, ignore_eos=True, extra_args=extra)


def _warm_prompts(cfg: BenchConfig, wl: Workload) -> list[list[int]]:
    return wl.prompts if cfg.warmup_requests is None else wl.prompts[: cfg.warmup_requests]


def _warm_sampling(cfg: BenchConfig, extra=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=min(2, cfg.output_len), ignore_eos=True, extra_args=extra)


def _vllm_run(name, kind, k, concepts_used, llm, wl: Workload, params, encode_s_fn=None) -> RunResult:
    before = encode_s_fn() if encode_s_fn else 0.0
    outs, wall = _timed_generate(llm, wl.prompts, params)
    encode_s = (encode_s_fn() - before) if encode_s_fn else 0.0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, tpot, notes = _vllm_latencies(outs)
    return RunResult(name=name, kind=kind, k=k, concepts_used=concepts_used, num_requests=len(outs),
                     prompt_tokens=sum(len(o.prompt_token_ids) for o in outs), output_tokens=out_tokens,
                     wall_s=wall, ttft_ms=ttft, tpot_ms=tpot, encode_s=encode_s, notes=notes)


Log = Callable[[str], None]


def run_vanilla(cfg: BenchConfig, model: BenchModel, wl: Workload, log: Log) -> tuple[RunResult, dict]:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=str(model.model_dir), **_engine_kwargs(cfg))
    startup = time.perf_counter() - t0
    try:
        info = {"startup_s": round(startup, 2), "kv": _kv_capacity(llm), "scheduler": _sched_info(llm)}
        warm = _warm_prompts(cfg, wl)
        if warm:
            _timed_generate(llm, warm, [_warm_sampling(cfg)] * len(warm))
        log("vanilla vLLM: timed run ...")
        res = _vllm_run("vanilla vLLM", "vanilla", None, 0, llm, wl, [_sampling(cfg)] * len(wl.prompts))
    finally:
        shutdown_engine(llm)
    return res, info


def run_flas(cfg: BenchConfig, model: BenchModel, wl: Workload, log: Log) -> tuple[list[RunResult], dict]:
    from flas_vllm.llm import FlasLLM
    from flas_vllm.steering import steering

    t0 = time.perf_counter()
    llm = FlasLLM(str(model.model_dir), str(model.checkpoint_dir), max_concepts=cfg.max_concepts,
                  **_engine_kwargs(cfg))
    startup = time.perf_counter() - t0
    results: list[RunResult] = []
    try:
        info = {"startup_s": round(startup, 2), "kv": _kv_capacity(llm), "scheduler": _sched_info(llm),
                "max_concepts": cfg.max_concepts}

        def encode_s() -> float:
            return float(llm.concept_stats()["encode_seconds"])

        n = len(wl.prompts)
        flowtimes = make_flowtimes(n, cfg.seed)
        # warm-up: both code paths (unsteered and steered), concepts never used again
        warm = _warm_prompts(cfg, wl)
        if warm:
            wc = make_concepts(2, "warmup")
            params = [_warm_sampling(cfg, steering(wc[i % 2], 1.0) if i % 2 else None) for i in range(len(warm))]
            _timed_generate(llm, warm, params)

        log("flas-vllm unsteered: timed run ...")
        results.append(_vllm_run("flas-vllm unsteered", "flas-unsteered", 0, 0, llm, wl,
                                 [_sampling(cfg)] * n, encode_s))
        for k in cfg.ks:
            concepts = assign_round_robin(n, make_concepts(k, f"k{k}"))
            params = [_sampling(cfg, steering(c, t)) for c, t in zip(concepts, flowtimes)]
            log(f"flas-vllm steered, K={k}: timed run ...")
            r = _vllm_run(f"flas-vllm K={k}", "flas-steered", k, len(set(concepts)), llm, wl, params, encode_s)
            if k > n:
                r.notes.append(f"only {n} requests: {len(set(concepts))} of the K={k} concepts are used")
            seqs = info["scheduler"]["max_num_seqs"]
            if min(k, n) > seqs:
                r.notes.append(f"at most max_num_seqs={seqs} requests (so concepts) run at once")
            results.append(r)
        info["concept_encoding"] = _probe_encoding(llm, cfg, wl.prompts[0])
    finally:
        shutdown_engine(llm)
    return results, info


def _probe_encoding(llm, cfg: BenchConfig, flush_prompt: list[int]) -> dict:
    """Latency of encoding a new concept: engine counters, and preload_concepts() of fresh ones (RPC included)."""
    # A finished request's concept slot is released at the NEXT engine step: one tiny unsteered
    # request frees the last run's slots, so the probes below find room without waiting.
    from vllm import SamplingParams

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
        out["preload_one_concept_ms"] = _ms(percentiles(one_by_one))
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
    import torch

    from flas_vllm.hf import HFSteerer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.dtype) if cfg.dtype not in ("auto",) else torch.float32
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(cfg.hf_threads or max(1, _cpu_count() - 1))
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
                          wall_s=wall, ttft_ms=_ms(percentiles(ttft)), tpot_ms=_ms(percentiles(tpot)),
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
            info["encode_one_concept_ms"] = _ms(percentiles(lat))
            info["encode_one_concept_mean_ms"] = round(1000.0 * sum(lat) / len(lat), 3)
    finally:
        handle.remove()
        torch.set_num_threads(old_threads)
        del steerer
        gc.collect()
    return results, info


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# analytic FLOPs


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def base_flops_per_token(base: Any, context: float) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of one token of the base model at `context` keys attended.

    Counted: Q/K/V/O projections, attention scores and values (sliding layers see
    min(context, window)), the gated MLP, the LM head. Not counted: norms,
    embeddings look-up, soft-caps, RoPE (all O(H) per token).
    """
    h = int(_get(base, "hidden_size"))
    nh = int(_get(base, "num_attention_heads"))
    nkv = int(_get(base, "num_key_value_heads") or nh)
    d = int(_get(base, "head_dim") or h // nh)
    inter = int(_get(base, "intermediate_size"))
    layers = int(_get(base, "num_hidden_layers"))
    vocab = int(_get(base, "vocab_size"))
    window = _get(base, "sliding_window")
    types = list(_get(base, "layer_types") or [])
    if len(types) != layers:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    proj = 2 * h * (nh * d + 2 * nkv * d) + 2 * nh * d * h
    mlp = 2 * 3 * h * inter
    attn = 0.0
    for t in types:
        ctx = min(context, window) if (t == "sliding_attention" and window) else context
        attn += 4 * nh * d * ctx
    layer_total = layers * (proj + mlp) + attn
    head = 2 * h * vocab
    return {"projections": layers * proj, "mlp": layers * mlp, "attention": attn, "lm_head": head,
            "total": layer_total + head}


def flow_flops_per_token(base: Any, flas: Any, n_steps: int, context: float) -> dict[str, float]:
    """Forward FLOPs of the FLAS flow for one steered token.

    n_steps x (time embedding + num_blocks x (cross-attention projections + attention
    over concept_max_len concept keys + self-attention + MLP)). The slot table attends
    over all concept_max_len (64) key slots, masked, whatever the concept's length.
    The concept's own K/V projection runs once per concept and is amortized (not counted).
    """
    from flas_vllm.flow import TIME_EMBED_DIM

    h = int(_get(base, "hidden_size"))
    nh = int(_get(base, "num_attention_heads"))
    nkv = int(_get(base, "num_key_value_heads") or nh)
    d = int(_get(base, "head_dim") or h // nh)
    inter = int(_get(base, "intermediate_size"))
    blocks = int(_get(flas, "num_blocks"))
    lc = int(_get(flas, "concept_max_len", 64) or 64)
    time_embed = 2 * (TIME_EMBED_DIM * h + h * h)
    cross = 0 if _get(flas, "disable_cross_attn", False) else 2 * h * nh * d + 2 * nh * d * h + 4 * nh * d * lc
    self_attn = 0 if _get(flas, "disable_self_attn", False) else (
        2 * h * (nh * d + 2 * nkv * d) + 2 * nh * d * h + 4 * nh * d * context)
    mlp = 0 if _get(flas, "disable_mlp", False) else 2 * 3 * h * inter
    per_block = cross + self_attn + mlp
    return {"time_embedding": n_steps * time_embed, "cross_attention": n_steps * blocks * cross,
            "self_attention": n_steps * blocks * self_attn, "mlp": n_steps * blocks * mlp,
            "total": n_steps * (time_embed + blocks * per_block)}


def flops_ceiling(base: Any, flas: Any, n_steps: int, context: float) -> dict[str, Any]:
    b = base_flops_per_token(base, context)
    f = flow_flops_per_token(base, flas, n_steps, context)
    return {
        "context_tokens": round(context, 1),
        "base_flops_per_token": b["total"],
        "flow_flops_per_token": f["total"],
        "flow_over_base": round(f["total"] / b["total"], 5),
        "throughput_ceiling": round(b["total"] / (b["total"] + f["total"]), 5),
        "base_breakdown": b,
        "flow_breakdown": f,
    }


def flops_section(model: BenchModel, cfg: BenchConfig, wl: Workload) -> dict:
    from transformers import AutoConfig

    from flas_vllm.checkpoint import load_checkpoint

    base = AutoConfig.from_pretrained(str(model.model_dir))
    ckpt = load_checkpoint(str(model.checkpoint_dir), base)
    flas, n_steps = ckpt.config, ckpt.config.n_steps
    mean_prompt = wl.prompt_tokens / max(1, len(wl.prompts))
    ctx = mean_prompt + (cfg.output_len + 1) / 2.0  # mean context of a generated token
    flas_info = {"layer": flas.layer, "num_blocks": flas.num_blocks, "n_steps": n_steps,
                 "concept_max_len": flas.concept_max_len}
    return {
        "note": "ceiling = base / (base + flow) FLOPs per token with the flow on every token. In a step with "
                "any steered token the flow runs on every token of the batch (torch.where keeps unsteered "
                "ones), so the ceiling holds for mixed and fully steered batches; without CUDA graphs "
                "(CPU, eager) steps with no steered token skip the flow, with CUDA graphs it always runs",
        "flas": flas_info,
        "at_mean_context": flops_ceiling(base, flas, n_steps, ctx),
        "weights_only": flops_ceiling(base, flas, n_steps, 0.0),
        "reference_gemma_2_2b_dims": {
            "note": "analytic only: google/gemma-2-2b-it dimensions (256k vocab) with this flow config",
            **flops_ceiling(GEMMA2_2B_DIMS, flas, n_steps, ctx),
        },
    }


# ---------------------------------------------------------------------------
# report


def _environment(cfg: BenchConfig) -> dict:
    import torch

    from flas_vllm import __version__

    env = {"flas_vllm": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "machine": platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch_threads": torch.get_num_threads(), "compile": not cfg.enforce_eager,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    env["cpus"] = _cpu_count()
    for mod in ("vllm", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # pragma: no cover
            env[mod] = f"not importable ({exc})"
    try:
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return env


def _fmt(x, nd=1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def _pct(p: dict | None) -> str:
    if not p:
        return "n/a"
    return " / ".join(_fmt(p[k], 1) for k in ("p50", "p90", "p99"))


def render_markdown(report: dict) -> str:
    cfg, runs = report["config"], report["runs"]
    lines = [f"# flas-vllm benchmark: `{cfg['model']}`", ""]
    env = report["environment"]
    lines.append(
        f"{cfg['num_prompts']} prompts ({report['workload']['mean_prompt_tokens']:.1f} prompt tokens on average), "
        f"{cfg['output_len']} output tokens each (greedy, ignore_eos), dtype {cfg['dtype']}, "
        f"{'compiled' if not cfg['enforce_eager'] else 'eager'}; vLLM {env.get('vllm')}, torch {env.get('torch')}, "
        f"{env.get('cuda') or str(env.get('cpus')) + ' CPU cores'}; {env.get('time')}."
    )
    lines += ["", "TTFT and TPOT in ms as p50 / p90 / p99. TTFT counts from the start of the offline batch "
              "(every request arrives at once), so it includes queueing.", ""]
    lines.append("| run | K | concepts | requests | wall s | output tok/s | total tok/s | x vanilla (output) "
                 "| x vanilla (total) | TTFT ms | TPOT ms | encode s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in runs:
        name = r["name"] + (f" (= K={r['reused_from_k']})" if r.get("reused_from_k") else "")
        lines.append(
            f"| {name} | {_fmt(r['k']) if r['k'] else '-'} | {r['concepts_used']} | {r['num_requests']} "
            f"| {_fmt(r['wall_s'], 2)} | {_fmt(r['output_tok_s'])} | {_fmt(r['total_tok_s'])} "
            f"| {_fmt(r['ratio_output_to_vanilla'], 3)} | {_fmt(r['ratio_total_to_vanilla'], 3)} "
            f"| {_pct(r['ttft_ms'])} | {_pct(r['tpot_ms'])} | {_fmt(r['encode_s'], 3)} |"
        )
    fl = report["flops"]
    a, w, ref = fl["at_mean_context"], fl["weights_only"], fl["reference_gemma_2_2b_dims"]
    lines += [
        "",
        "## Throughput ceiling implied by FLOPs",
        "",
        f"Flow: layer {fl['flas']['layer']}, {fl['flas']['num_blocks']} block(s), {fl['flas']['n_steps']} Euler "
        f"steps, cross-attention over {fl['flas']['concept_max_len']} concept slots. {fl['note']}.",
        "",
        "| model | context | base MFLOP/token | flow MFLOP/token | flow / base | ceiling base/(base+flow) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, c in (("this model", a), ("this model", w), ("Gemma-2-2B dims (analytic)", ref)):
        lines.append(f"| {label} | {c['context_tokens']} | {c['base_flops_per_token'] / 1e6:,.2f} "
                     f"| {c['flow_flops_per_token'] / 1e6:,.2f} | {c['flow_over_base']:.3f} "
                     f"| {c['throughput_ceiling']:.3f} |")
    kv = report["kv_capacity"]
    lines += ["", "## KV cache capacity (same kv_cache_memory_bytes)", "",
              "| engine | blocks x block_size (tokens) | vLLM KV cache size (tokens, group-aware) "
              "| flas / vanilla (blocks; group-aware) |",
              "|---|---:|---:|---:|"]
    ratios = kv.get("ratio_flas_to_vanilla") or {}
    for label, key in (("vanilla vLLM", "vanilla"), ("flas-vllm", "flas")):
        e = kv.get(key) or {}
        if key == "vanilla":
            ratio = "1"
        else:
            ratio = " / ".join(_fmt(ratios[k], 3) for k in ("blocks_x_block_size_tokens", "group_aware_tokens")
                               if k in ratios) or "n/a"
        lines.append(f"| {label} | {_fmt(e.get('blocks_x_block_size_tokens'))} "
                     f"| {_fmt(e.get('group_aware_tokens'))} | {ratio} |")
    enc = report["concept_encoding"]
    lines += ["", "## Encoding a new concept", ""]
    if enc.get("engine_mean_encode_ms") is not None:
        lines.append(f"- flas-vllm engine counters: {enc['engine_encoded']} concepts encoded in "
                     f"{enc['engine_encode_seconds']:.3f} s, {enc['engine_mean_encode_ms']:.2f} ms each "
                     "(inside the engine step, blocks it)")
    if enc.get("preload_one_concept_ms"):
        lines.append(f"- `FlasLLM.preload_concepts([c])` of a fresh concept (RPC included): "
                     f"{_pct(enc['preload_one_concept_ms'])} ms (p50 / p90 / p99)")
    if enc.get("preload_batch"):
        pb = enc["preload_batch"]
        lines.append(f"- `preload_concepts` of {pb['concepts']} fresh concepts at once: {pb['seconds']:.3f} s "
                     f"({pb['per_concept_ms']:.2f} ms per concept)")
    if enc.get("hf_encode_one_concept_ms"):
        lines.append(f"- transformers path, one fresh concept: {_pct(enc['hf_encode_one_concept_ms'])} ms")
    if report.get("not_measured"):
        lines += ["", "## Not measured", ""] + [f"- {x}" for x in report["not_measured"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    """Output tokens/s vs K. Returns None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install 'flas-vllm[bench]'): no PNG plot"
    runs = report["runs"]
    van = next(r for r in runs if r["kind"] == "vanilla")
    uns = next((r for r in runs if r["kind"] == "flas-unsteered"), None)
    steered = [r for r in runs if r["kind"] == "flas-steered"]
    hf = [r for r in runs if r["kind"] == "hf"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(van["output_tok_s"], color="black", ls="-", lw=1.2, label="vanilla vLLM")
    ceiling = report["flops"]["at_mean_context"]["throughput_ceiling"]
    ax.axhline(van["output_tok_s"] * ceiling, color="gray", ls=":", lw=1.2,
               label=f"FLOPs ceiling ({ceiling:.2f} x vanilla)")
    if uns:
        ax.axhline(uns["output_tok_s"], color="tab:green", ls="--", lw=1.2, label="flas-vllm, unsteered")
    if steered:
        ax.plot([r["k"] for r in steered], [r["output_tok_s"] for r in steered], "o-", color="tab:blue",
                label="flas-vllm, K concepts")
    if hf:
        ax.plot([r["k"] for r in hf], [r["output_tok_s"] for r in hf], "s-", color="tab:red",
                label="transformers path (1 concept / batch)")
    ax.set_xscale("log", base=2)
    ks = sorted({r["k"] for r in steered + hf})
    if ks:
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("K distinct concepts in the batch")
    ax.set_ylabel("output tokens / s")
    cfg = report["config"]
    ax.set_title(f"{cfg['model']}: {cfg['num_prompts']} prompts x {cfg['output_len']} tokens")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def summary_lines(report: dict) -> list[str]:
    out = [f"ratios to vanilla vLLM ({report['config']['model']}, output tokens/s; total tokens/s):"]
    for r in report["runs"]:
        if r["kind"] == "vanilla":
            out.append(f"  {r['name']:<28} {r['output_tok_s']:>10.1f} tok/s  (reference)")
            continue
        out.append(f"  {r['name']:<28} {r['output_tok_s']:>10.1f} tok/s  x{r['ratio_output_to_vanilla']:.3f}"
                   f"  (total x{r['ratio_total_to_vanilla']:.3f})")
    fl = report["flops"]["at_mean_context"]
    out.append(f"  FLOPs ceiling (all tokens through the flow): x{fl['throughput_ceiling']:.3f}")
    kv = report["kv_capacity"].get("ratio_flas_to_vanilla") or {}
    if kv:
        k = "group_aware_tokens" if "group_aware_tokens" in kv else "blocks_x_block_size_tokens"
        out.append(f"  KV capacity, flas / vanilla ({k}): x{kv[k]:.3f}")
    return out


# ---------------------------------------------------------------------------
# the whole run


def run_benchmark(cfg: BenchConfig, *, log: Callable[[str], None] = print) -> dict:
    """Run every configuration, write bench_<model>.{json,md,png} into cfg.out_dir, return the report."""
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    log(f"preparing model {cfg.model!r} ...")
    model = prepare_model(cfg.model)
    wl = build_workload(model.model_dir, cfg.num_prompts, cfg.max_prompt_tokens)
    env = _environment(cfg)
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
    if max(cfg.ks) > cfg.num_prompts:
        notes.append(f"num_prompts={cfg.num_prompts} < max K={max(cfg.ks)}: larger K have fewer concepts in flight")

    log("[1/3] vanilla vLLM ...")
    vanilla, vinfo = run_vanilla(cfg, model, wl, log)
    log("[2/3] flas-vllm (unsteered, then K concepts) ...")
    flas_runs, finfo = run_flas(cfg, model, wl, log)
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

    runs = [vanilla, *flas_runs, *hf_runs]
    for r in runs:
        r.ratio_output_to_vanilla = round(r.output_tok_s / vanilla.output_tok_s, 4)
        r.ratio_total_to_vanilla = round(r.total_tok_s / vanilla.total_tok_s, 4)
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
                     "output_len": cfg.output_len, "flowtime_range": [0.5, 2.0], "assignment": "round-robin"},
        "engines": {"vanilla": vinfo, "flas": {k: v for k, v in finfo.items() if k != "concept_encoding"},
                    "hf": hinfo},
        "runs": [r.as_dict() for r in runs],
        "ratios": {r.name: {"output_tok_s": r.ratio_output_to_vanilla, "total_tok_s": r.ratio_total_to_vanilla}
                   for r in runs if r is not vanilla},
        "flops": flops_section(model, cfg, wl),
        "kv_capacity": kv,
        "concept_encoding": encoding,
        "not_measured": not_measured,
        "notes": notes,
    }
    try:
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    env["total_seconds"] = round(time.perf_counter() - t_start, 1)

    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{cfg.model}"
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
