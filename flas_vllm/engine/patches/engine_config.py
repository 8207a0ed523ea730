"""Front end: check a FLAS engine's config before anything starts; keep V2's default choice for other models.

Wraps `EngineArgs.create_engine_config` (every `LLM`, `AsyncLLM` and the
OpenAI server build their config through it, before any process or weight
exists) to run `flas_vllm.engine.checks` on FLAS engines: unsupported
parallelism and a runner FLAS cannot drive are refused by name, and the
checkpoint's fingerprint joins the compile-cache key.

Wraps `VllmConfig._get_v2_model_runner_unsupported_features`, vLLM's own list
of "features V2 lacks, so use V1": for a FLAS model (only) it adds FLAS
steering while the FLAS model has no V2 model state. vLLM then picks V1 for
that engine and says why, an explicit `VLLM_USE_V2_MODEL_RUNNER` still wins
(and is refused by the check above), and every other model keeps vLLM's
default runner.
"""

from __future__ import annotations

import functools

from . import wrap_once


def _make_create(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from flas_vllm.engine.checks import check_engine_args, check_vllm_config

        check_engine_args(self)
        config = original(self, *args, **kwargs)
        check_vllm_config(config)
        return config

    return create_engine_config


def _make_unsupported(original):
    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        from flas_vllm.engine.checks import flas_drives_v2, is_flas_model

        if is_flas_model(self.model_config) and not flas_drives_v2():
            archs = ", ".join(getattr(self.model_config, "architectures", None) or []) or "FLAS"
            found = [*found, f"FLAS steering ({archs})"]
        return found

    return _get_v2_model_runner_unsupported_features


def install() -> bool:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    done = wrap_once(EngineArgs, "create_engine_config", _make_create)
    done |= wrap_once(VllmConfig, "_get_v2_model_runner_unsupported_features", _make_unsupported)
    return done
