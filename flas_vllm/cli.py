"""The `flas-vllm` command line: a thin shell over each area's commands (serve/, eval/, bench/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flas_vllm import __version__
from flas_vllm.bench.command import bench
from flas_vllm.engine import compat
from flas_vllm.eval import commands as eval_commands
from flas_vllm.serve import commands as serve_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FLAS activation steering on vLLM: many concepts and flowtimes in one batch.")
serve_commands.register(app)
eval_commands.register(app)
app.command()(bench)


@app.command()
def demo(
    max_tokens: int = typer.Option(32, min=1, max=512, help="tokens to generate per request"),
    compile: bool = typer.Option(False, "--compile/--eager", help="use vLLM's default compilation"),
    random_flow: bool = typer.Option(False, "--random-flow", help="random flow weights instead of the trained "
                                     "toy flow: steering changes the text, but toward no concept"),
) -> None:
    """Steer a tiny built-in fixture toward three concepts at flowtimes 0, 1, 2; print the text and a measure."""
    from flas_vllm.demo import run_demo  # lazy: the demo imports vLLM

    run_demo(max_tokens=max_tokens, enforce_eager=not compile, random_flow=random_flow)


@app.command("make-fixture")
def make_fixture(
    out_dir: Path = typer.Argument(..., help="directory to create (the tiny Gemma-2 model goes here)"),
    checkpoints: bool = typer.Option(True, help="also write FLAS checkpoints under OUT_DIR/flas-*: the trained "
                                     "toy flow (flas-trained) and random ones"),
    overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Build a deterministic tiny Gemma-2 model (and FLAS checkpoints) loadable by vLLM and transformers."""
    # lazy: torch, via the fixture builders; the CLI starts without it
    from flas_vllm.fixtures.checkpoints import make_random_flas_checkpoint
    from flas_vllm.fixtures.tiny_gemma2 import make_fixture as build
    from flas_vllm.fixtures.trained_flow import train_fixture_flow

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


@app.command("check-vllm")
def check_vllm(
    source: Optional[Path] = typer.Argument(None, help="a vLLM wheel (.whl) or source directory; "
                                                       "default: the installed vllm"),
) -> None:
    """Check a vLLM release's source (not installed) for everything flas-vllm wraps, subclasses or calls."""
    raise typer.Exit(compat.main([str(source)] if source is not None else []))


@app.command()
def version() -> None:
    """Print versions of flas-vllm, vLLM and torch."""
    import torch  # lazy: torch is heavy

    try:
        import vllm  # optional: vllm (cpu/cuda extra)

        vllm_version: Optional[str] = vllm.__version__
    except Exception as exc:  # vLLM is an extra
        vllm_version = f"not importable ({exc})"
    typer.echo(f"flas-vllm {__version__}, vllm {vllm_version}, torch {torch.__version__}")


if __name__ == "__main__":
    app()
