"""The `flas-vllm` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FLAS activation steering on vLLM: many concepts and flowtimes in one batch.")


@app.command()
def demo(
    max_tokens: int = typer.Option(24, min=1, max=512, help="tokens to generate per request"),
    compile: bool = typer.Option(False, "--compile/--eager", help="use vLLM's default compilation"),
) -> None:
    """Steer a tiny built-in fixture toward several concepts and flowtimes; print steered vs unsteered."""
    from flas_vllm.demo import run_demo

    run_demo(max_tokens=max_tokens, enforce_eager=not compile)


@app.command("make-fixture")
def make_fixture(
    out_dir: Path = typer.Argument(..., help="directory to create (the tiny Gemma-2 model goes here)"),
    checkpoints: bool = typer.Option(True, help="also write random FLAS checkpoints under OUT_DIR/flas-*"),
    overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Build a deterministic tiny Gemma-2 model (and random FLAS checkpoints) loadable by vLLM and transformers."""
    from flas_vllm.fixture_checkpoints import make_random_flas_checkpoint
    from flas_vllm.fixtures import make_fixture as build

    model_dir = build(out_dir / "model", overwrite=overwrite)
    typer.echo(f"model: {model_dir}")
    if checkpoints:
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
    from flas_vllm.server import serve as run_server

    run_server(list(ctx.args))


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
