"""What a FLAS engine needs from vLLM, checked in the front end before any weights load.

Steering is per token: each forward pass reads one token -> request mapping.
Tensor or pipeline parallelism would need the flow and the concept encoder
sharded, and dual-batch overlap (micro-batching) runs the forward once per
slice of that mapping, and adaptive draft verification lays it out on the
device, so each would steer the wrong tokens; a runner FLAS does not drive
would steer nothing at all. All are refused by name where the user set them. `patches/engine_config.py` runs these checks on every engine
config (`FlasLLM`, `flas-vllm serve`, a plain `vllm.LLM` with FLAS
`hf_overrides`), and the model's constructor repeats the runner and
fingerprint checks in the worker. Non-FLAS engines are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flas_vllm.core.config import FlasEngineOptions, FlowGeometry
from flas_vllm.core.errors import FlasCheckpointError, FlasConfigError
from flas_vllm.core.families import ARCHITECTURES
from flas_vllm.engine.graph_modes import split_piecewise_graphs_at_the_flow

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
FINGERPRINT_ATTR = "flas_fingerprint"  # on the HF config, which vLLM hashes into its compile-cache key
CONCEPT_ATTENTION_ATTR = "flas_concept_attention"  # likewise: the concept attention a traced graph holds


def overrides_are_flas(hf_overrides: Any) -> bool:
    if not isinstance(hf_overrides, Mapping):
        return False
    return "flas" in hf_overrides or bool(ARCHITECTURES & set(hf_overrides.get("architectures") or []))


def is_flas_model(model_config: Any) -> bool:
    if model_config is None:
        return False
    hf_config = getattr(model_config, "hf_config", None)
    return bool(ARCHITECTURES & set(getattr(model_config, "architectures", None) or [])) or (
        getattr(hf_config, "flas", None) is not None
    )


def check_parallelism(*, tensor_parallel_size: int, pipeline_parallel_size: int, enable_dbo: bool,
                      ubatch_size: int) -> None:
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("pipeline_parallel_size", pipeline_parallel_size)):
        if value != 1:
            raise FlasConfigError(
                f"{name}={value}: flas-vllm supports {name}=1 only (the flow and its concept encoder "
                "are not sharded); scale out with data_parallel_size instead (one replica per GPU)"
            )
    if enable_dbo:
        raise FlasConfigError(
            "enable_dbo=True: flas-vllm does not support dual-batch overlap (its micro-batches would "
            "misindex per-token steering); leave enable_dbo off"
        )
    if ubatch_size > 1:
        raise FlasConfigError(
            f"ubatch_size={ubatch_size}: flas-vllm does not support micro-batching (it would misindex "
            "per-token steering); use ubatch_size 0 or 1"
        )


# vLLM's automatic runner choice gives FLAS engines its V1 runner. The V2 path (engine/model_state.py)
# runs in whole engines on CPU only with Triton's interpreter standing in for a Triton backend
# (tests/test_engine_v2.py), and has not yet run on a GPU (real Triton, CUDA graphs, async copies).
# VLLM_USE_V2_MODEL_RUNNER=1 selects it explicitly.
V2_BY_DEFAULT = False


def v1_preference(model_config: Any) -> str | None:
    """The entry FLAS adds to vLLM's "V2 does not support" list, or None where V2 was asked for by name."""
    import vllm.envs as envs  # lazy: vllm is heavy

    if V2_BY_DEFAULT or envs.VLLM_USE_V2_MODEL_RUNNER is not None:
        return None
    archs = ", ".join(getattr(model_config, "architectures", None) or []) or "FLAS"
    return f"FLAS steering ({archs}) unless {V2_ENV}=1 is set"


def check_engine_args(args: Any) -> None:
    """Before vLLM builds its config, whose own checks would otherwise fail first and less clearly."""
    if not overrides_are_flas(getattr(args, "hf_overrides", None)):
        return
    check_parallelism(tensor_parallel_size=args.tensor_parallel_size,
                      pipeline_parallel_size=args.pipeline_parallel_size,
                      enable_dbo=bool(args.enable_dbo), ubatch_size=int(args.ubatch_size or 0))
    check_speculative(getattr(args, "speculative_config", None))


def check_speculative(spec: Any) -> None:
    """`spec`: EngineArgs' speculative_config (a dict) or vLLM's SpeculativeConfig."""
    adaptive = spec.get("enable_adaptive_verification") if isinstance(spec, Mapping) else getattr(
        spec, "enable_adaptive_verification", False)
    if adaptive:
        raise FlasConfigError(
            "speculative_config.enable_adaptive_verification=True: flas-vllm does not support adaptive draft "
            "verification (each request's token count is decided on the device, so per-token steering "
            "cannot be laid out in advance); leave it off"
        )


def check_runner(vllm_config: Any) -> None:
    """Refuse a model runner FLAS does not drive: it would steer nothing, silently.

    V2 drives steering through the model's own state class (`get_model_state_cls`);
    V1 through the runner hook, which the general plugin installs.
    """
    if vllm_config.use_v2_model_runner:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # lazy: vllm is heavy

    if not getattr(GPUModelRunner._prepare_inputs, "__flas_patched__", False):
        raise FlasConfigError(
            "VLLM_PLUGINS: the flas_vllm general plugin did not load in this process, so vLLM's V1 model "
            "runner has no FLAS hook and every request would run unsteered; include flas_vllm in "
            "VLLM_PLUGINS (or leave it unset)"
        )


def stamp_fingerprint(hf_config: Any) -> str:
    """Record the checkpoint's content hash on the HF config, which vLLM hashes into its compile-cache key.

    The checkpoint path alone is already in that key (through `hf_config.flas`);
    the fingerprint makes a checkpoint replaced in place compile afresh.
    """
    from flas_vllm.core.checkpoint import checkpoint_fingerprint  # lazy: torch, via core.checkpoint

    options = FlasEngineOptions.from_hf_config(hf_config)
    fingerprint = checkpoint_fingerprint(options.checkpoint)
    setattr(hf_config, FINGERPRINT_ATTR, fingerprint)
    return fingerprint


def check_concept_attention(hf_config: Any) -> str:
    """FLAS_VLLM_CONCEPT_ATTENTION is read in the worker; a bad value is refused here, before anything starts.

    The choice is recorded on the HF config: it decides which op a traced graph holds (the gather's or
    FlexAttention's), so it must be part of vLLM's compile-cache key, or a cached graph compiled with the
    other choice would be loaded (a KeyError for a table without FlexAttention, or flex silently unused)."""
    from flas_vllm.engine.concept_attention import requested_concept_attention  # lazy: imports torch

    try:
        choice = requested_concept_attention()
    except ValueError as exc:
        raise FlasConfigError(str(exc)) from None
    setattr(hf_config, CONCEPT_ATTENTION_ATTR, choice)
    return choice


def check_vllm_config(vllm_config: Any) -> None:
    """Front end, once the config exists: parallelism, runner, and the compile-cache fingerprint."""
    if not is_flas_model(vllm_config.model_config):
        return
    pc = vllm_config.parallel_config
    check_parallelism(tensor_parallel_size=pc.tensor_parallel_size, pipeline_parallel_size=pc.pipeline_parallel_size,
                      enable_dbo=bool(pc.enable_dbo), ubatch_size=int(pc.ubatch_size or 0))
    check_speculative(vllm_config.speculative_config)
    check_runner(vllm_config)
    check_concept_attention(vllm_config.model_config.hf_config)
    stamp_fingerprint(vllm_config.model_config.hf_config)
    keep_flow_kv_unquantized(vllm_config.cache_config, vllm_config.model_config.hf_config)
    options = FlasEngineOptions.from_hf_config(vllm_config.model_config.hf_config)
    split_piecewise_graphs_at_the_flow(vllm_config.compilation_config, options.graph_path, options.flow_graphs)


def flow_layer_indices(num_hidden_layers: int, max_n_steps: int, num_blocks: int) -> list[int]:
    """The layer index of each flow self-attention (Euler step k, block b): num_hidden_layers + k*num_blocks + b."""
    return [num_hidden_layers + k * num_blocks + b for k in range(max_n_steps) for b in range(num_blocks)]


def keep_flow_kv_unquantized(cache_config: Any, hf_config: Any) -> list[str]:
    """Put the flow's paged self-attention layers on vLLM's `kv_cache_dtype_skip_layers` list.

    A quantized KV cache (`kv_cache_dtype=fp8`, or a checkpoint's KV-cache scheme, which vLLM
    resolves into `cache_dtype` here) would store the flow's keys and values in fp8 with an
    uncalibrated scale of 1.0; skipped layers keep the model dtype, their KV spec says so, and
    the allocator sizes their pages for it. Every FLAS engine gets the entries (harmless with an
    unquantized cache), so a scheme applied later in the worker cannot reach the flow either.
    Returns the entries added.
    """
    from flas_vllm.core.checkpoint import read_checkpoint_config  # lazy: torch, via core.checkpoint

    options = FlasEngineOptions.from_hf_config(hf_config)
    cfg = read_checkpoint_config(options.checkpoint)
    if cfg.disable_self_attn:
        return []
    _, max_n_steps = options.step_limits(cfg.n_steps)
    layers = FlowGeometry.from_base_config(hf_config).num_hidden_layers
    wanted = [str(i) for i in flow_layer_indices(layers, max_n_steps, cfg.num_blocks)]
    have = list(cache_config.kv_cache_dtype_skip_layers or [])
    added = [i for i in wanted if i not in have]
    cache_config.kv_cache_dtype_skip_layers = have + added
    return added


def check_flow_kv_dtype(attn: Any) -> None:
    """In the worker: a flow self-attention layer stores its KV in the model dtype, never quantized."""
    if attn.kv_cache_dtype != "auto":
        raise FlasConfigError(
            f"kv_cache_dtype={attn.kv_cache_dtype}: the FLAS flow's self-attention layer {attn.layer_name} would "
            "store its KV quantized with an uncalibrated scale; the flas_vllm front end puts the flow's layers on "
            "kv_cache_dtype_skip_layers (build the engine through EngineArgs.create_engine_config, e.g. FlasLLM or "
            "vllm.LLM with the flas_vllm plugin loaded), or use kv_cache_dtype=auto"
        )


def check_fingerprint(hf_config: Any, loaded_fingerprint: str) -> None:
    """In the worker: the checkpoint loaded is the one whose fingerprint keyed the compile cache."""
    stamped = getattr(hf_config, FINGERPRINT_ATTR, None)
    if stamped is not None and stamped != loaded_fingerprint:
        raise FlasCheckpointError(
            f"flas checkpoint: its weights changed while the engine started (fingerprint {stamped} when "
            f"configured, {loaded_fingerprint} when loaded); restart the engine"
        )
