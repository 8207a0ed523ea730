"""What a FLAS engine needs from vLLM, checked in the front end before any weights load.

Steering is per token: each forward pass reads one token -> request mapping.
Tensor or pipeline parallelism would need the flow and the concept encoder
sharded, and dual-batch overlap (micro-batching) runs the forward once per
slice of that mapping, so each would steer the wrong tokens; a runner FLAS
does not hook would steer nothing at all. All are refused by name where the
user set them. `patches/engine_config.py` runs these checks on every engine
config (`FlasLLM`, `flas-vllm serve`, a plain `vllm.LLM` with FLAS
`hf_overrides`), and the model's constructor repeats the runner and
fingerprint checks in the worker. Non-FLAS engines are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flas_vllm.core.errors import FlasCheckpointError, FlasConfigError
from flas_vllm.core.families import ARCHITECTURES

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
FINGERPRINT_ATTR = "flas_fingerprint"  # on the HF config, which vLLM hashes into its compile-cache key


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


def flas_drives_v2() -> bool:
    """True once the FLAS model provides a Model Runner V2 model state (`get_model_state_cls`)."""
    from flas_vllm.engine.model import FlasCausalLMMixin

    return hasattr(FlasCausalLMMixin, "get_model_state_cls")


def _v2_refusal(reason: str) -> FlasConfigError:
    return FlasConfigError(
        f"{V2_ENV}: vLLM selected its Model Runner V2 ({reason}), which flas-vllm cannot drive yet: "
        f"every request would run unsteered. Set {V2_ENV}=0 (and drop options that require V2, "
        "such as watermarking or HiSparse attention)"
    )


def check_engine_args(args: Any) -> None:
    """Before vLLM builds its config, whose own checks would otherwise fail first and less clearly."""
    if not overrides_are_flas(getattr(args, "hf_overrides", None)):
        return
    check_parallelism(tensor_parallel_size=args.tensor_parallel_size,
                      pipeline_parallel_size=args.pipeline_parallel_size,
                      enable_dbo=bool(args.enable_dbo), ubatch_size=int(args.ubatch_size or 0))
    import vllm.envs as envs

    if envs.VLLM_USE_V2_MODEL_RUNNER and not flas_drives_v2():
        raise _v2_refusal(f"{V2_ENV}=1 is set")


def check_runner(vllm_config: Any) -> None:
    """Refuse a model runner whose per-step hook FLAS does not have: it would steer nothing, silently."""
    if vllm_config.use_v2_model_runner:
        if flas_drives_v2():
            return
        import vllm.envs as envs

        raise _v2_refusal(f"{V2_ENV}=1 is set" if envs.VLLM_USE_V2_MODEL_RUNNER else
                          "an engine option that only V2 supports forced it")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

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
    from flas_vllm.core.checkpoint import checkpoint_fingerprint
    from flas_vllm.core.config import FlasEngineOptions

    options = FlasEngineOptions.from_hf_config(hf_config)
    fingerprint = checkpoint_fingerprint(options.checkpoint)
    setattr(hf_config, FINGERPRINT_ATTR, fingerprint)
    return fingerprint


def check_vllm_config(vllm_config: Any) -> None:
    """Front end, once the config exists: parallelism, runner, and the compile-cache fingerprint."""
    if not is_flas_model(vllm_config.model_config):
        return
    pc = vllm_config.parallel_config
    check_parallelism(tensor_parallel_size=pc.tensor_parallel_size, pipeline_parallel_size=pc.pipeline_parallel_size,
                      enable_dbo=bool(pc.enable_dbo), ubatch_size=int(pc.ubatch_size or 0))
    check_runner(vllm_config)
    stamp_fingerprint(vllm_config.model_config.hf_config)


def check_fingerprint(hf_config: Any, loaded_fingerprint: str) -> None:
    """In the worker: the checkpoint loaded is the one whose fingerprint keyed the compile cache."""
    stamped = getattr(hf_config, FINGERPRINT_ATTR, None)
    if stamped is not None and stamped != loaded_fingerprint:
        raise FlasCheckpointError(
            f"flas checkpoint: its weights changed while the engine started (fingerprint {stamped} when "
            f"configured, {loaded_fingerprint} when loaded); restart the engine"
        )
