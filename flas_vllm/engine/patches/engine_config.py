"""Front end: check a FLAS engine's config before anything starts; keep V2's default choice for other models.

Wraps `EngineArgs.create_engine_config` (every `LLM`, `AsyncLLM` and the
OpenAI server build their config through it, before any process or weight
exists) to run `flas_vllm.engine.checks` on FLAS engines: unsupported
parallelism and a runner FLAS cannot drive are refused by name, and the
checkpoint's fingerprint joins the compile-cache key.

Wraps `VllmConfig._get_v2_model_runner_unsupported_features`, vLLM's own list
of "features V2 lacks, so use V1": for a FLAS model (only), and only where
`VLLM_USE_V2_MODEL_RUNNER` is unset, it adds FLAS steering (see
`checks.V2_BY_DEFAULT`). vLLM then picks V1 for that engine and says why; an
explicit `VLLM_USE_V2_MODEL_RUNNER=1` runs FLAS on V2 (`engine/model_state.py`);
every other model keeps vLLM's default runner.
"""

from __future__ import annotations

import functools

from . import wrap_once
from flas_vllm.engine.checks import check_engine_args, check_vllm_config, is_flas_model, v1_preference


def _make_create(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        check_engine_args(self)
        config = original(self, *args, **kwargs)
        check_vllm_config(config)
        return config

    return create_engine_config


def _make_unsupported(original):
    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        entry = v1_preference(self.model_config) if is_flas_model(self.model_config) else None
        return [*found, entry] if entry else found

    return _get_v2_model_runner_unsupported_features


def install() -> bool:
    # lazy: vllm; patches install only inside vLLM
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    done = wrap_once(EngineArgs, "create_engine_config", _make_create)
    done |= wrap_once(VllmConfig, "_get_v2_model_runner_unsupported_features", _make_unsupported)
    return done
