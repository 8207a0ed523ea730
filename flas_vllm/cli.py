"""The `flas-vllm` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FLAS activation steering on vLLM: many concepts and flowtimes in one batch.")


@app.command()
def demo(
    max_tokens: int = typer.Option(32, min=1, max=512, help="tokens to generate per request"),
    compile: bool = typer.Option(False, "--compile/--eager", help="use vLLM's default compilation"),
    random_flow: bool = typer.Option(False, "--random-flow", help="random flow weights instead of the trained "
                                     "toy flow: steering changes the text, but toward no concept"),
) -> None:
    """Steer a tiny built-in fixture toward three concepts at flowtimes 0, 1, 2; print the text and a measure."""
    from flas_vllm.demo import run_demo

    run_demo(max_tokens=max_tokens, enforce_eager=not compile, random_flow=random_flow)


@app.command("make-fixture")
def make_fixture(
    out_dir: Path = typer.Argument(..., help="directory to create (the tiny Gemma-2 model goes here)"),
    checkpoints: bool = typer.Option(True, help="also write FLAS checkpoints under OUT_DIR/flas-*: the trained "
                                     "toy flow (flas-trained) and random ones"),
    overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Build a deterministic tiny Gemma-2 model (and FLAS checkpoints) loadable by vLLM and transformers."""
    from flas_vllm.fixture_checkpoints import make_random_flas_checkpoint
    from flas_vllm.fixture_flow import train_fixture_flow
    from flas_vllm.fixtures import make_fixture as build

    model_dir = build(out_dir / "model", overwrite=overwrite)
    typer.echo(f"model: {model_dir}")
    if checkpoints:
        info = train_fixture_flow(model_dir, out_dir / "flas-trained")
        typer.echo(f"checkpoint: {out_dir / 'flas-trained'} (trained in {info['train_seconds']} s, "
                   f"loss {info['first_loss']} -> {info['final_loss']})")
        variants = {
            "flas-1block": dict(num_blocks=1),
            "flas-2block": dict(num_blocks=2),
            "flas-no-self-attn": dict(num_blocks=1, disable_self_attn=True),
            "flas-bf16": dict(num_blocks=1, dtype="bfloat16"),
            "flas-pt": dict(num_blocks=1, fmt="pt"),
        }
        for name, variant in variants.items():
            path = make_random_flas_checkpoint(out_dir / name, model_dir, **variant)
            typer.echo(f"checkpoint: {path}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="flas-vllm serve MODEL --flas-checkpoint CKPT [--n-steps N] [--max-concepts N] "
    "[--max-flowtime T], plus any vLLM server flag: the OpenAI-compatible steering server.",
)
def serve(ctx: typer.Context) -> None:
    from flas_vllm.errors import FlasError
    from flas_vllm.server import serve as run_server

    try:
        run_server(list(ctx.args))
    except FlasError as exc:  # a setting or checkpoint refused before the engine started: say which, no traceback
        raise typer.BadParameter(str(exc)) from None


@app.command()
def chat(
    model: str = typer.Argument(..., help="a plain Gemma-2 model: directory or Hugging Face id"),
    flas_checkpoint: str = typer.Option(..., help="FLAS checkpoint: file, directory or Hub repo id"),
    n_steps: Optional[int] = typer.Option(None, min=1, help="Euler steps (default: the checkpoint's)"),
    max_tokens: int = typer.Option(128, min=1, help="tokens per reply"),
    temperature: float = typer.Option(0.0, min=0.0, help="sampling temperature (0 = greedy)"),
    dtype: str = typer.Option("auto", help="model dtype (auto, float32, bfloat16, ...)"),
    max_model_len: Optional[int] = typer.Option(None, min=16, help="context length"),
    eager: bool = typer.Option(False, "--eager", help="skip vLLM compilation (faster start)"),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, help="KV cache size in bytes"),
) -> None:
    """Interactive steering REPL: /concept TEXT, /flowtime T, /off, /on, /compare, /quit."""
    from flas_vllm.chat import run_repl
    from flas_vllm.llm import FlasLLM

    typer.echo("loading the model ...")
    kwargs = {"dtype": dtype, "enforce_eager": eager}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    llm = FlasLLM(model, flas_checkpoint, n_steps=n_steps, **kwargs)
    run_repl(llm, max_tokens=max_tokens, temperature=temperature)


@app.command()
def bench(
    model: str = typer.Option("fixture", help="fixture (tiny trained Gemma-2) or bench-2b-shape "
                              "(Gemma-2-2B proportions, narrow, random weights)"),
    ks: str = typer.Option("1,8,64,256,1024", help="numbers of distinct concepts K, comma-separated"),
    num_prompts: Optional[int] = typer.Option(None, min=1, help="requests per run (default: the largest K)"),
    output_len: int = typer.Option(32, min=1, help="output tokens per request (ignore_eos, greedy)"),
    out: Path = typer.Option(Path("benchmarks/results"), help="directory for bench_<model>.{json,md,png}"),
    compile: bool = typer.Option(False, "--compile/--eager", help="use vLLM's default compilation"),
    dtype: str = typer.Option("float32", help="model dtype for every path"),
    kv_cache_mib: int = typer.Option(512, min=16, help="KV cache size in MiB (same for every engine)"),
    max_model_len: int = typer.Option(1024, min=64, help="context length of the vLLM engines"),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="also run the transformers path (one concept per batch)"),
    hf_max_prompts: Optional[int] = typer.Option(None, min=1, help="cap the transformers path's prompts"),
) -> None:
    """Throughput and latency: vanilla vLLM vs flas-vllm (unsteered, K concepts) vs the transformers path."""
    from flas_vllm.bench import MODELS, BenchConfig, parse_ks, run_benchmark

    if model not in MODELS:
        raise typer.BadParameter(f"must be one of {', '.join(MODELS)}", param_hint="--model")
    try:
        k_list = parse_ks(ks)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ks") from exc
    cfg = BenchConfig(model=model, ks=k_list, num_prompts=num_prompts, output_len=output_len, out_dir=out,
                      enforce_eager=not compile, dtype=dtype, kv_cache_memory_bytes=kv_cache_mib * 1024 * 1024,
                      max_model_len=max_model_len, hf=hf, hf_max_prompts=hf_max_prompts)
    run_benchmark(cfg, log=typer.echo)


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint=option)
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


def _spec(model, flas_checkpoint, concepts, prompts, num_prompts, flowtimes, max_tokens, temperature, top_p,
          seed, dtype, max_model_len, eager, kv_cache_memory_bytes, max_concepts, flush_rows=256,
          max_num_seqs=None, num_concepts=None, concept_ids_file=None, n_steps=None, max_prompt_tokens=512,
          stop_rule="original"):
    from flas_vllm.eval import GenerateSpec
    from flas_vllm.offline import GenerationSettings

    engine = {"dtype": dtype, "enforce_eager": eager}
    uses_fixture = model == FIXTURE and not Path(FIXTURE).exists()
    model, flas_checkpoint = _resolve_fixture(model, flas_checkpoint)
    if uses_fixture:  # a few MiB of KV are plenty for it; vLLM's CPU default is GiBs
        kv_cache_memory_bytes = kv_cache_memory_bytes or FIXTURE_KV_BYTES
        max_model_len = max_model_len or 1024
    if max_model_len:
        engine["max_model_len"] = max_model_len
    if kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if max_num_seqs:
        engine["max_num_seqs"] = max_num_seqs
    return GenerateSpec(
        model=model, checkpoint=flas_checkpoint, concepts=str(concepts), prompts=str(prompts),
        num_prompts=num_prompts, flowtimes=_floats(flowtimes, "--flowtimes"),
        settings=GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    flush_rows=flush_rows, max_prompt_tokens=max_prompt_tokens, stop_rule=stop_rule),
        engine_kwargs=engine, max_concepts=max_concepts, num_concepts=num_concepts, concept_ids=concept_ids_file,
        n_steps=n_steps,
    )


FIXTURE = "fixture"
FIXTURE_CHECKPOINTS = (FIXTURE, "fixture-random")
FIXTURE_KV_BYTES = 256 * 1024 * 1024


def _fixture_dir() -> Path:
    from flas_vllm.fixtures import ensure_tiny_gemma2

    return ensure_tiny_gemma2()


def _resolve_fixture(model: str, flas_checkpoint: str) -> tuple[str, str]:
    """`--model fixture`: the built-in tiny model; `--flas-checkpoint fixture` / `fixture-random`: its
    trained toy flow / a random flow."""
    if flas_checkpoint in FIXTURE_CHECKPOINTS and not Path(flas_checkpoint).exists():
        if model != FIXTURE:
            raise typer.BadParameter(f"{flas_checkpoint!r} is a checkpoint for the built-in fixture model only: "
                                     "use it with --model fixture", param_hint="--flas-checkpoint")
        from flas_vllm.fixture_checkpoints import ensure_flas_checkpoint
        from flas_vllm.fixture_flow import ensure_trained_flas_checkpoint

        model_dir = _fixture_dir()
        if flas_checkpoint == FIXTURE:
            return str(model_dir), str(ensure_trained_flas_checkpoint(model_dir))
        return str(model_dir), str(ensure_flas_checkpoint(model_dir, num_blocks=1))
    if model == FIXTURE and not Path(FIXTURE).exists():
        return str(_fixture_dir()), flas_checkpoint
    return model, flas_checkpoint


_GEN_OPTS = dict(
    model=typer.Option(..., help="a plain Gemma-2 model: directory or Hugging Face id ('fixture': the built-in "
                                 "tiny test model, built and cached on first use)"),
    flas_checkpoint=typer.Option(..., help="FLAS checkpoint: file, directory or Hub repo id (for --model fixture: "
                                           "'fixture', a toy flow trained on the fixture's three concepts, "
                                           "or 'fixture-random', random weights)"),
    concepts=typer.Option(None, help="AxBench metadata.jsonl, parquet, CSV or a text list (default: the bundled "
                                     "AxBench Concept500 list; 'fixture': the three concepts the fixture flow "
                                     "was trained on)"),
    num_concepts=typer.Option(None, min=1, help="only the first N concepts of the concept file, in file order "
                                                "(default: all)"),
    concept_ids_file=typer.Option(None, help="a JSON list of concept ids to run, looked up in --concepts (the "
                                             "original's --concept-ids-file format), or a bundled list: "
                                             "c16k-2b-ho100, c16k-2b-hi100, c16k-9b-ho100, c16k-9b-hi100"),
    prompts=typer.Option(None, help="AlpacaEval JSON, JSONL or parquet (default: the bundled AlpacaEval)"),
    n_steps=typer.Option(None, min=1, help="Euler steps per request (default: the checkpoint config's)"),
    max_prompt_tokens=typer.Option(512, min=1, help="keep the first N tokens of each formatted prompt, as the "
                                                    "original's generator does (512)"),
    stop_rule=typer.Option("original", help="original: stop only at <eos>, as the original FLAS generator (its "
                                            "judge scores text past <end_of_turn>); vllm: stop at every "
                                            "generation_config EOS id"),
)


def _bundled(path: Optional[Path], name: str) -> Path:
    if path is not None:
        return path
    from importlib import resources

    return Path(str(resources.files("flas_vllm.data").joinpath(name)))


def _concepts_path(path: Optional[Path]) -> Path:
    """`--concepts fixture`: the concepts the fixture flow was trained on; none: Concept500."""
    if path is not None and str(path) == FIXTURE and not path.exists():
        return _bundled(None, FIXTURE_CONCEPTS)
    return _bundled(path, BUNDLED_CONCEPTS)


BUNDLED_PROMPTS = "alpaca_eval.json"
BUNDLED_CONCEPTS = "concept500_2b_l20_metadata.jsonl"
FIXTURE_CONCEPTS = "fixture_concepts.jsonl"


@app.command()
def generate(
    out: Path = typer.Option(..., help="output directory (parts/ and generations.parquet); re-run to resume"),
    model: str = _GEN_OPTS["model"],
    flas_checkpoint: str = _GEN_OPTS["flas_checkpoint"],
    concepts: Optional[Path] = _GEN_OPTS["concepts"],
    num_concepts: Optional[int] = _GEN_OPTS["num_concepts"],
    concept_ids_file: Optional[str] = _GEN_OPTS["concept_ids_file"],
    prompts: Optional[Path] = _GEN_OPTS["prompts"],
    num_prompts: int = typer.Option(10, min=1, help="prompts per concept (AxBench's sampling rule)"),
    flowtimes: str = typer.Option("0.5,1,2", help="comma-separated flowtimes (0 = unsteered)"),
    n_steps: Optional[int] = _GEN_OPTS["n_steps"],
    max_prompt_tokens: int = _GEN_OPTS["max_prompt_tokens"],
    stop_rule: str = _GEN_OPTS["stop_rule"],
    max_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("auto"),
    max_model_len: Optional[int] = typer.Option(None, min=16),
    eager: bool = typer.Option(False, "--eager", help="skip vLLM compilation"),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None),
    max_concepts: Optional[int] = typer.Option(None, min=1, help="concept slots"),
    flush_rows: int = typer.Option(256, min=1, help="finished rows per durable parquet part"),
    max_num_seqs: Optional[int] = typer.Option(None, min=1, help="requests decoded at once (vLLM default)"),
    ray: bool = typer.Option(False, "--ray", help="shard concepts over a local Ray cluster"),
    ray_address: Optional[str] = typer.Option(None, help="join an existing Ray cluster (implies --ray)"),
    num_actors: int = typer.Option(2, min=1, help="Ray actors, one engine each"),
) -> None:
    """Bulk generation over concepts x prompts x flowtimes into parquet, resumable."""
    from flas_vllm.eval import run_generate, run_generate_ray

    spec = _spec(model, flas_checkpoint, _concepts_path(concepts), _bundled(prompts, BUNDLED_PROMPTS),
                 num_prompts, flowtimes, max_tokens, temperature, top_p, seed, dtype, max_model_len, eager,
                 kv_cache_memory_bytes, max_concepts, flush_rows, max_num_seqs, num_concepts, concept_ids_file,
                 n_steps, max_prompt_tokens, stop_rule)
    try:
        if ray or ray_address:
            table = run_generate_ray(spec, out, num_actors=num_actors, ray_address=ray_address)
        else:
            table = run_generate(spec, out)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc))
    typer.echo(f"{table.num_rows} rows in {out / 'generations.parquet'}")


_JUDGE_OPTS = dict(
    base_url=typer.Option(None, help="judge: OpenAI-compatible endpoint, e.g. https://api.openai.com/v1"),
    judge_model=typer.Option(None, help="judge model name"),
    local_judge=typer.Option(False, "--local-judge",
                             help="rate with the bundled offline lexical judge on 127.0.0.1 (a smoke-test "
                                  "stand-in, not AxBench's LLM judge) instead of --base-url"),
    api_key_env=typer.Option("OPENAI_API_KEY", help="environment variable holding the judge API key"),
    concurrency=typer.Option(16, min=1, max=1024, help="judge calls in flight"),
    allow_mixed_judges=typer.Option(False, "--allow-mixed-judges",
                                    help="allow one judge directory / one score to hold ratings from different "
                                         "judge models (refused by default: their numbers are not comparable)"),
)


@app.command()
def judge(
    generations: Path = typer.Option(..., help="what `flas-vllm generate --out` wrote: that directory, its "
                                               "generations.parquet or its parts/ directory"),
    out: Path = typer.Option(..., help="judge output directory; re-run to retry failures"),
    base_url: Optional[str] = _JUDGE_OPTS["base_url"],
    judge_model: Optional[str] = _JUDGE_OPTS["judge_model"],
    local_judge: bool = _JUDGE_OPTS["local_judge"],
    api_key_env: str = _JUDGE_OPTS["api_key_env"],
    concurrency: int = _JUDGE_OPTS["concurrency"],
    max_attempts: int = typer.Option(5, min=1, max=20),
    timeout: float = typer.Option(60.0, min=1.0),
    allow_mixed_judges: bool = _JUDGE_OPTS["allow_mixed_judges"],
) -> None:
    """Rate generations with AxBench's three judge templates; failures are kept and retried on resume."""
    import contextlib
    import os

    from flas_vllm.judge import JudgeSettings, MixedJudgesError, judge as run_judge
    from flas_vllm.lexical_judge import MODEL_NAME, lexical_judge_server
    from flas_vllm.offline import load_generations

    _check_judge_choice(base_url, judge_model, local_judge)
    try:
        rows = load_generations(generations)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--generations") from None
    with (lexical_judge_server() if local_judge else contextlib.nullcontext()) as server:
        settings = JudgeSettings(base_url=server.base_url if local_judge else base_url,
                                 model=MODEL_NAME if local_judge else judge_model,
                                 api_key=os.environ.get(api_key_env, "EMPTY"), concurrency=concurrency,
                                 max_attempts=max_attempts, timeout_seconds=timeout)
        try:
            stats = run_judge(rows, out, settings, allow_mixed=allow_mixed_judges)
        except MixedJudgesError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out")
    typer.echo(json.dumps(stats))


def _check_judge_choice(base_url: Optional[str], judge_model: Optional[str], local_judge: bool) -> None:
    if local_judge and (base_url or judge_model):
        raise typer.BadParameter("give either --local-judge or --base-url/--judge-model, not both",
                                 param_hint="--local-judge")
    if not local_judge and not (base_url and judge_model):
        missing = "--base-url" if not base_url else "--judge-model"
        raise typer.BadParameter("a judge is needed: give --base-url and --judge-model (any OpenAI-compatible "
                                 "endpoint), or --local-judge for the offline smoke-test judge", param_hint=missing)


@app.command("judge-server")
def judge_server(
    port: int = typer.Option(8100, min=0, max=65535),
    host: str = typer.Option("127.0.0.1"),
) -> None:
    """Serve the offline lexical judge (a smoke-test stand-in for AxBench's LLM judge) until Ctrl-C."""
    import time

    from flas_vllm.lexical_judge import MODEL_NAME, lexical_judge_server

    try:
        server = lexical_judge_server(port=port, host=host)
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror or exc}", param_hint="--port")
    with server:
        typer.echo(f"lexical judge at {server.base_url} (model name {MODEL_NAME}); Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command()
def score(
    judgements: Path = typer.Option(..., help="judge output directory"),
    out: Path = typer.Option(..., help="report directory (summary.json, report.md, plot PNG)"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    factors: Optional[str] = typer.Option(None, help="the flowtimes a concept's best factor is chosen from, in "
                                          "tie-break order (default: every flowtime > 0 present, ascending); "
                                          "flowtime 0 rows are reported as the unsteered baseline and are a "
                                          "factor only when listed here"),
    allow_mixed_judges: bool = _JUDGE_OPTS["allow_mixed_judges"],
) -> None:
    """AxBench scores as FLAS reports them: best factor per concept on train prompts, HMean/C/I/F pooled over
    the kept test samples; per-concept mean, bootstrap CI, baseline, judge provenance, report and plot."""
    from flas_vllm.judge import latest_judgements
    from flas_vllm.score import score_rows, write_reports

    rows = list(latest_judgements(judgements).values())
    if not rows:
        raise typer.BadParameter(f"no judgements found in {judgements}", param_hint="--judgements")
    try:
        result = score_rows(rows, factors=None if factors is None else _floats(factors, "--factors"),
                            allow_mixed_judges=allow_mixed_judges, seed=seed, source=str(judgements))
    except ValueError as exc:
        hint = "--factors" if str(exc).startswith("--factors") else "--judgements"
        raise typer.BadParameter(str(exc), param_hint=hint)
    names = {r["concept_id"]: r["concept"] for r in rows}
    paths = write_reports(result, out, names)
    s = result["summary"]
    lo, hi = s["ci95_bootstrap_over_concepts"]["hmean"]
    typer.echo(f"HMean {s['hmean']:.3f} over {s['n_test_samples']} pooled test samples of "
               f"{s['n_concepts_scored']} concepts (95% CI {lo:.3f}..{hi:.3f}; per-concept mean "
               f"{s['per_concept_mean']['hmean']:.3f}); {s['judge_failures']} judge failures; "
               f"judge {', '.join(s['judge']['judge_model'])}; report: {paths['markdown']}")


def _eval_factors(flowtimes: str, factors: Optional[str]) -> str:
    """Checked before any engine starts: the steered --flowtimes as given, or --factors drawn from --flowtimes."""
    times = _floats(flowtimes, "--flowtimes")
    if factors is None:
        chosen = [t for t in times if t != 0]
        if not chosen:
            raise typer.BadParameter("no flowtime above 0 to choose from: add one, or give --factors 0 to score "
                                     "the unsteered model", param_hint="--flowtimes")
    else:
        chosen = _floats(factors, "--factors")
        missing = [t for t in chosen if t not in times]
        if missing:
            raise typer.BadParameter(f"{', '.join(f'{t:g}' for t in missing)} not among --flowtimes {flowtimes}",
                                     param_hint="--factors")
    return ",".join(repr(t) for t in chosen)


@app.command("eval")
def eval_command(
    out: Path = typer.Option(..., help="run directory: generate/, judge/, report/"),
    model: str = _GEN_OPTS["model"],
    flas_checkpoint: str = _GEN_OPTS["flas_checkpoint"],
    concepts: Optional[Path] = _GEN_OPTS["concepts"],
    num_concepts: Optional[int] = _GEN_OPTS["num_concepts"],
    concept_ids_file: Optional[str] = _GEN_OPTS["concept_ids_file"],
    base_url: Optional[str] = _JUDGE_OPTS["base_url"],
    judge_model: Optional[str] = _JUDGE_OPTS["judge_model"],
    local_judge: bool = _JUDGE_OPTS["local_judge"],
    prompts: Optional[Path] = _GEN_OPTS["prompts"],
    api_key_env: str = _JUDGE_OPTS["api_key_env"],
    num_prompts: int = typer.Option(10, min=1),
    flowtimes: str = typer.Option("0.5,1,2"),
    n_steps: Optional[int] = _GEN_OPTS["n_steps"],
    max_prompt_tokens: int = _GEN_OPTS["max_prompt_tokens"],
    stop_rule: str = _GEN_OPTS["stop_rule"],
    max_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("auto"),
    max_model_len: Optional[int] = typer.Option(None, min=16),
    eager: bool = typer.Option(False, "--eager"),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None),
    ray: bool = typer.Option(False, "--ray", help="shard concepts over a local Ray cluster"),
    ray_address: Optional[str] = typer.Option(None, help="join an existing Ray cluster"),
    num_actors: int = typer.Option(2, min=1),
    concurrency: int = _JUDGE_OPTS["concurrency"],
    allow_mixed_judges: bool = _JUDGE_OPTS["allow_mixed_judges"],
    factors: Optional[str] = typer.Option(None, help="the flowtimes each concept's best factor is chosen from, in "
                                          "tie-break order (default: the --flowtimes above 0, as given); "
                                          "flowtime 0 rows are the unsteered baseline, a factor only if listed"),
) -> None:
    """generate -> judge -> score in one command (each stage resumes where it stopped)."""
    _check_judge_choice(base_url, judge_model, local_judge)
    factors = _eval_factors(flowtimes, factors)
    generate(out=out / "generate", model=model, flas_checkpoint=flas_checkpoint, concepts=concepts,
             num_concepts=num_concepts, concept_ids_file=concept_ids_file, prompts=prompts,
             num_prompts=num_prompts, flowtimes=flowtimes, n_steps=n_steps, max_prompt_tokens=max_prompt_tokens,
             stop_rule=stop_rule, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed, dtype=dtype,
             max_model_len=max_model_len, eager=eager, kv_cache_memory_bytes=kv_cache_memory_bytes,
             max_concepts=None, flush_rows=256, max_num_seqs=None, ray=ray, ray_address=ray_address,
             num_actors=num_actors)
    judge(generations=out / "generate" / "generations.parquet", out=out / "judge", base_url=base_url,
          judge_model=judge_model, local_judge=local_judge, api_key_env=api_key_env, concurrency=concurrency,
          max_attempts=5, timeout=60.0, allow_mixed_judges=allow_mixed_judges)
    score(judgements=out / "judge", out=out / "report", seed=seed, factors=factors,
          allow_mixed_judges=allow_mixed_judges)


@app.command("check-vllm")
def check_vllm(
    source: Optional[Path] = typer.Argument(None, help="a vLLM wheel (.whl) or source directory; "
                                                       "default: the installed vllm"),
) -> None:
    """Check a vLLM release's source (not installed) for everything flas-vllm wraps, subclasses or calls."""
    from flas_vllm.compat import main

    raise typer.Exit(main([str(source)] if source is not None else []))


@app.command()
def version() -> None:
    """Print versions of flas-vllm, vLLM and torch."""
    import torch

    from flas_vllm import __version__

    try:
        import vllm

        vllm_version: Optional[str] = vllm.__version__
    except Exception as exc:  # vLLM is an extra
        vllm_version = f"not importable ({exc})"
    typer.echo(f"flas-vllm {__version__}, vllm {vllm_version}, torch {torch.__version__}")


if __name__ == "__main__":
    app()
