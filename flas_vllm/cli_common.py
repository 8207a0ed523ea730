"""What the commands share: vLLM engine arguments passed through, FLAS engine options, the fixture alias."""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from flas_vllm.core.config import ENGINE_OPTION_DEFAULTS as D
from flas_vllm.core.errors import FlasError
from flas_vllm.fixtures import tiny_gemma2

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
"""Context settings of a command that takes any vLLM engine argument (`--gpu-memory-utilization`, ...)."""

FIXTURE = "fixture"
FIXTURE_CHECKPOINTS = (FIXTURE, "fixture-random")
FIXTURE_CONCEPTS = "fixture_concepts.jsonl"
FIXTURE_KV_BYTES = 256 * 1024 * 1024

MODEL_OPTION = typer.Option(..., help="the base model (Gemma-2, Gemma-3, Qwen3, Llama-3.1): directory or Hugging "
                                      "Face id ('fixture': the built-in tiny test model, built on first use)")
CHECKPOINT_OPTION = typer.Option(..., help="FLAS checkpoint: file, directory or Hub repo id (for --model fixture: "
                                           "'fixture', a toy flow trained on the fixture's three concepts, or "
                                           "'fixture-random', random weights)")
N_STEPS_OPTION = typer.Option(None, min=1, help="Euler steps per request (default: the checkpoint config's)")
EAGER_OPTION = typer.Option(False, "--eager", help="skip vLLM compilation (faster start; vLLM's --enforce-eager)")
MAX_CONCEPTS_OPTION = typer.Option(None, min=1, help=f"concept slots held at once (default {D['max_concepts']})")


@contextlib.contextmanager
def refused_in_one_line() -> Iterator[None]:
    """A model, checkpoint or setting refused before the engine starts: one line naming it, no traceback."""
    try:
        yield
    except FlasError as exc:
        raise typer.BadParameter(str(exc)) from None


def vllm_engine_args(args: list[str]) -> dict[str, Any]:
    """The vLLM engine arguments a user gave (only those set), parsed by vLLM's own parser.

    Anything vLLM's `EngineArgs` accepts passes through (`--gpu-memory-utilization`, `--max-num-seqs`,
    `--quantization`, ...); anything else is an error naming it.
    """
    if not args:
        return {}
    # lazy: vllm is heavy and optional (cpu/cuda extra)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="flas-vllm", add_help=False))
    known, unknown = parser.parse_known_args(args)
    if unknown:
        raise typer.BadParameter(f"{' '.join(unknown)}: neither a flas-vllm option of this command nor a vLLM "
                                 "engine argument (see --help and `vllm serve --help`)")
    defaults = vars(parser.parse_args([]))
    given = {k: v for k, v in vars(known).items() if v != defaults.get(k)}
    given.pop("model", None)
    return given


def floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint=option)
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


def resolve_fixture(model: str, flas_checkpoint: str) -> tuple[str, str]:
    """`--model fixture`: the built-in tiny model; `--flas-checkpoint fixture` / `fixture-random`: its
    trained toy flow / a random flow."""
    if flas_checkpoint in FIXTURE_CHECKPOINTS and not Path(flas_checkpoint).exists():
        if model != FIXTURE:
            raise typer.BadParameter(f"{flas_checkpoint!r} is a checkpoint for the built-in fixture model only: "
                                     "use it with --model fixture", param_hint="--flas-checkpoint")
        # lazy: torch, via the fixture builders
        from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
        from flas_vllm.fixtures.trained_flow import ensure_trained_flas_checkpoint

        model_dir = _fixture_dir()
        if flas_checkpoint == FIXTURE:
            return str(model_dir), str(ensure_trained_flas_checkpoint(model_dir))
        return str(model_dir), str(ensure_flas_checkpoint(model_dir, num_blocks=1))
    if model == FIXTURE and not Path(FIXTURE).exists():
        return str(_fixture_dir()), flas_checkpoint
    return model, flas_checkpoint


def _fixture_dir() -> Path:
    return tiny_gemma2.ensure_tiny_gemma2()  # looked up at call time: tests replace it


def engine_kwargs(model: str, extra_args: list[str], *, eager: bool) -> dict[str, Any]:
    """vLLM engine arguments of a command: the passed-through ones, `--eager`, and small defaults for the fixture."""
    kwargs = vllm_engine_args(extra_args)
    if eager:
        kwargs["enforce_eager"] = True
    if model == FIXTURE and not Path(FIXTURE).exists():  # a few MiB of KV are plenty for it
        kwargs.setdefault("kv_cache_memory_bytes", FIXTURE_KV_BYTES)
        kwargs.setdefault("max_model_len", 1024)
    return kwargs


def optional_path(path: Optional[Path], bundled_name: str) -> Path:
    """`path`, or the bundled data file of that name."""
    if path is not None:
        return path
    return Path(str(resources.files("flas_vllm.data").joinpath(bundled_name)))
