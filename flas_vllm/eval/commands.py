"""`flas-vllm generate / judge / score / eval / judge-server`: each stage takes the previous stage's output
directory; `eval` is the three stages composed, with their options (not copies of them)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
import time
from typing import Optional, get_type_hints

import typer

from flas_vllm.cli_common import (
    FIXTURE, FIXTURE_CONCEPTS, CHECKPOINT_OPTION, EAGER_OPTION, MAX_CONCEPTS_OPTION, MODEL_OPTION, N_STEPS_OPTION, PASS_THROUGH, engine_kwargs,
    floats, optional_path, resolve_fixture,
)
from flas_vllm.eval.lexical_judge import MODEL_NAME, lexical_judge_server

BUNDLED_PROMPTS = "alpaca_eval.json"
BUNDLED_CONCEPTS = "concept500_2b_l20_metadata.jsonl"
MIXED_JUDGES_OPTION = typer.Option(False, "--allow-mixed-judges",
                                   help="allow one judge directory / one score to hold ratings from different "
                                        "judge models (refused by default: their numbers are not comparable)")


def generate(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="output directory (parts/ and generations.parquet); re-run to resume"),
    model: str = MODEL_OPTION,
    flas_checkpoint: str = CHECKPOINT_OPTION,
    concepts: Optional[Path] = typer.Option(None, help="AxBench metadata.jsonl, parquet, CSV or a text list "
                                                       "(default: the bundled AxBench Concept500 list; 'fixture': "
                                                       "the three concepts the fixture flow was trained on)"),
    num_concepts: Optional[int] = typer.Option(None, min=1, help="only the first N concepts of the concept file, "
                                                                 "in file order (default: all)"),
    concept_ids_file: Optional[str] = typer.Option(
        None, help="a JSON list of concept ids to run, looked up in --concepts (the original's --concept-ids-file "
                   "format), or a bundled list: c16k-2b-ho100, c16k-2b-hi100, c16k-9b-ho100, c16k-9b-hi100"),
    prompts: Optional[Path] = typer.Option(None, help="AlpacaEval JSON, JSONL or parquet (default: the bundled "
                                                      "AlpacaEval)"),
    num_prompts: int = typer.Option(10, min=1, help="prompts per concept (AxBench's sampling rule)"),
    flowtimes: str = typer.Option("0.5,1,2", help="comma-separated flowtimes (0 = unsteered)"),
    n_steps: Optional[int] = N_STEPS_OPTION,
    max_prompt_tokens: int = typer.Option(512, min=1, help="keep the first N tokens of each formatted prompt, as "
                                                           "the original's generator does (512)"),
    stop_rule: str = typer.Option("original", help="original: stop only at <eos>, as the original FLAS generator "
                                                   "(its judge scores text past <end_of_turn>); vllm: stop at every "
                                                   "generation_config EOS id"),
    max_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0, help="sampling seed (and the score's bootstrap seed in `eval`)"),
    eager: bool = EAGER_OPTION,
    max_concepts: Optional[int] = MAX_CONCEPTS_OPTION,
    flush_rows: int = typer.Option(256, min=1, help="finished rows per durable parquet part"),
    ray: bool = typer.Option(False, "--ray", help="shard concepts over a local Ray cluster"),
    ray_address: Optional[str] = typer.Option(None, help="join an existing Ray cluster (implies --ray)"),
    num_actors: int = typer.Option(2, min=1, help="Ray actors, one engine each"),
) -> None:
    """Bulk generation over concepts x prompts x flowtimes into parquet, resumable; any vLLM engine argument
    (--gpu-memory-utilization, --max-num-seqs, --dtype, --quantization, ...) passes through."""
    # lazy: pyarrow, via the eval pipeline; the CLI starts without it
    from flas_vllm.eval.generate import GenerationSettings
    from flas_vllm.eval.pipeline import GenerateSpec, run_generate, run_generate_ray

    engine = engine_kwargs(model, ctx.args, eager=eager)
    model, flas_checkpoint = resolve_fixture(model, flas_checkpoint)
    spec = GenerateSpec(
        model=model, checkpoint=flas_checkpoint, concepts=str(_concepts_path(concepts)),
        prompts=str(optional_path(prompts, BUNDLED_PROMPTS)), num_prompts=num_prompts,
        flowtimes=floats(flowtimes, "--flowtimes"),
        settings=GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    flush_rows=flush_rows, max_prompt_tokens=max_prompt_tokens, stop_rule=stop_rule),
        engine_kwargs=engine, max_concepts=max_concepts, num_concepts=num_concepts, concept_ids=concept_ids_file,
        n_steps=n_steps,
    )
    try:
        if ray or ray_address:
            table = run_generate_ray(spec, out, num_actors=num_actors, ray_address=ray_address)
        else:
            table = run_generate(spec, out)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc))
    typer.echo(f"{table.num_rows} rows in {out / 'generations.parquet'}")


def _concepts_path(path: Optional[Path]) -> Path:
    """`--concepts fixture`: the concepts the fixture flow was trained on; none: Concept500."""
    if path is not None and str(path) == FIXTURE and not path.exists():
        return optional_path(None, FIXTURE_CONCEPTS)
    return optional_path(path, BUNDLED_CONCEPTS)


def judge(
    generations: Path = typer.Option(..., help="what `flas-vllm generate --out` wrote: that directory, its "
                                               "generations.parquet or its parts/ directory"),
    out: Path = typer.Option(..., help="judge output directory; re-run to retry failures"),
    base_url: Optional[str] = typer.Option(None, help="judge: OpenAI-compatible endpoint, e.g. "
                                                      "https://api.openai.com/v1"),
    judge_model: Optional[str] = typer.Option(None, help="judge model name"),
    local_judge: bool = typer.Option(False, "--local-judge",
                                     help="rate with the bundled offline lexical judge on 127.0.0.1 (a smoke-test "
                                          "stand-in, not AxBench's LLM judge) instead of --base-url"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the judge API key"),
    concurrency: int = typer.Option(16, min=1, max=1024, help="judge calls in flight"),
    max_attempts: int = typer.Option(5, min=1, max=20),
    timeout: float = typer.Option(60.0, min=1.0),
    allow_mixed_judges: bool = MIXED_JUDGES_OPTION,
) -> None:
    """Rate generations with AxBench's three judge templates; failures are kept and retried on resume."""
    # lazy: pyarrow, via the eval pipeline; the CLI starts without it
    from flas_vllm.eval.generate import load_generations
    from flas_vllm.eval.judge import JudgeSettings, MixedJudgesError, judge as run_judge

    check_judge_choice(base_url, judge_model, local_judge)
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


def check_judge_choice(base_url: Optional[str], judge_model: Optional[str], local_judge: bool) -> None:
    if local_judge and (base_url or judge_model):
        raise typer.BadParameter("give either --local-judge or --base-url/--judge-model, not both",
                                 param_hint="--local-judge")
    if not local_judge and not (base_url and judge_model):
        missing = "--base-url" if not base_url else "--judge-model"
        raise typer.BadParameter("a judge is needed: give --base-url and --judge-model (any OpenAI-compatible "
                                 "endpoint), or --local-judge for the offline smoke-test judge", param_hint=missing)


def score(
    judgements: Path = typer.Option(..., help="what `flas-vllm judge --out` wrote"),
    out: Path = typer.Option(..., help="report directory (summary.json, report.md, plot PNG)"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    factors: Optional[str] = typer.Option(None, help="the flowtimes a concept's best factor is chosen from, in "
                                          "tie-break order (default: every flowtime > 0 present, ascending; in "
                                          "`eval`: the --flowtimes above 0, as given); flowtime 0 rows are the "
                                          "unsteered baseline, a factor only when listed here"),
    allow_mixed_judges: bool = MIXED_JUDGES_OPTION,
) -> None:
    """AxBench scores as FLAS reports them: best factor per concept on train prompts, HMean/C/I/F pooled over
    the kept test samples; per-concept mean, bootstrap CI, baseline, judge provenance, report and plot."""
    # lazy: pyarrow, via the eval pipeline; the CLI starts without it
    from flas_vllm.eval.judge import latest_judgements
    from flas_vllm.eval.score import score_rows, write_reports

    rows = list(latest_judgements(judgements).values())
    if not rows:
        raise typer.BadParameter(f"no judgements found in {judgements}", param_hint="--judgements")
    try:
        result = score_rows(rows, factors=None if factors is None else floats(factors, "--factors"),
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


def eval_factors(flowtimes: str, factors: Optional[str]) -> str:
    """Checked before any engine starts: the steered --flowtimes as given, or --factors drawn from --flowtimes."""
    times = floats(flowtimes, "--flowtimes")
    if factors is None:
        chosen = [t for t in times if t != 0]
        if not chosen:
            raise typer.BadParameter("no flowtime above 0 to choose from: add one, or give --factors 0 to score "
                                     "the unsteered model", param_hint="--flowtimes")
    else:
        chosen = floats(factors, "--factors")
        missing = [t for t in chosen if t not in times]
        if missing:
            raise typer.BadParameter(f"{', '.join(f'{t:g}' for t in missing)} not among --flowtimes {flowtimes}",
                                     param_hint="--factors")
    return ",".join(repr(t) for t in chosen)


# The stage options `eval` does not take: each stage's input and output are its run directory's parts.
_EVAL_OWNS = {"ctx", "out", "generations", "judgements"}
_STAGES = (generate, judge, score)


def eval_command(ctx: typer.Context, out: Path, **options) -> None:
    """generate -> judge -> score in one command, into OUT/generate, OUT/judge and OUT/report (each stage
    resumes where it stopped); takes every option of the three stages, and vLLM engine arguments."""
    check_judge_choice(options["base_url"], options["judge_model"], options["local_judge"])
    factors = eval_factors(options["flowtimes"], options["factors"])

    def stage_options(stage):
        return {k: options[k] for k in inspect.signature(stage).parameters if k not in _EVAL_OWNS}

    generate(ctx, out=out / "generate", **stage_options(generate))
    judge(generations=out / "generate", out=out / "judge", **stage_options(judge))
    score(judgements=out / "judge", out=out / "report", **{**stage_options(score), "factors": factors})


def _eval_signature() -> inspect.Signature:
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                default=typer.Option(..., help="run directory: generate/, judge/, report/"))]
    seen = set(_EVAL_OWNS)
    for stage in _STAGES:
        hints = get_type_hints(stage)
        for p in inspect.signature(stage).parameters.values():
            if p.name not in seen:
                seen.add(p.name)
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]))
    return inspect.Signature(params)


eval_command.__signature__ = _eval_signature()
eval_command.__annotations__ = {p.name: p.annotation for p in eval_command.__signature__.parameters.values()}


def judge_server(
    port: int = typer.Option(8100, min=0, max=65535),
    host: str = typer.Option("127.0.0.1"),
) -> None:
    """Serve the offline lexical judge (a smoke-test stand-in for AxBench's LLM judge) until Ctrl-C."""
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


def register(app: typer.Typer) -> None:
    app.command(context_settings=PASS_THROUGH)(generate)
    app.command()(judge)
    app.command()(score)
    app.command("eval", context_settings=PASS_THROUGH)(eval_command)
    app.command("judge-server")(judge_server)
