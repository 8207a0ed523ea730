"""`flas-vllm serve` and `flas-vllm chat`."""

from __future__ import annotations

from typing import Optional

import typer

from flas_vllm.cli_common import (
    CHECKPOINT_OPTION, EAGER_OPTION, N_STEPS_OPTION, PASS_THROUGH, engine_kwargs, refused_in_one_line,
)
from flas_vllm.engine.llm import FlasLLM
from flas_vllm.serve.repl import run_repl


def serve(ctx: typer.Context) -> None:
    from flas_vllm.serve.server import serve as run_server  # lazy: it imports vLLM's server

    with refused_in_one_line():
        run_server(list(ctx.args))


def chat(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="the base model: directory or Hugging Face id"),
    flas_checkpoint: str = CHECKPOINT_OPTION,
    n_steps: Optional[int] = N_STEPS_OPTION,
    max_tokens: int = typer.Option(128, min=1, help="tokens per reply"),
    temperature: float = typer.Option(0.0, min=0.0, help="sampling temperature (0 = greedy)"),
    eager: bool = EAGER_OPTION,
) -> None:
    """Interactive steering REPL: /concept TEXT, /flowtime T, /off, /on, /compare, /quit; any vLLM engine
    argument (--dtype, --max-model-len, --kv-cache-memory-bytes, ...) passes through."""
    kwargs = engine_kwargs(model, ctx.args, eager=eager)
    typer.echo("loading the model ...")
    with refused_in_one_line():
        llm = FlasLLM(model, flas_checkpoint, n_steps=n_steps, **kwargs)
    run_repl(llm, max_tokens=max_tokens, temperature=temperature)


def register(app: typer.Typer) -> None:
    app.command(context_settings=PASS_THROUGH,
                help="flas-vllm serve MODEL --flas-checkpoint CKPT [--n-steps N] [--max-n-steps N] "
                     "[--max-concepts N] [--max-flowtime T], plus any vLLM server flag: the OpenAI-compatible "
                     "steering server.")(serve)
    app.command(context_settings=PASS_THROUGH)(chat)
