"""A FLAS engine's config is checked in the front end, before any process or weight exists; others are untouched.

Real vLLM configs (`EngineArgs.create_engine_config`, no engine started) built
from the tiny Gemma-2 and a fixture checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from flas_vllm.core.errors import FlasCheckpointError, FlasConfigError  # noqa: E402
from flas_vllm.engine.llm import flas_engine_kwargs  # noqa: E402

V2 = "VLLM_USE_V2_MODEL_RUNNER"


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt()


@pytest.fixture(autouse=True)
def _no_runner_choice(monkeypatch):
    monkeypatch.delenv(V2, raising=False)


def _config(model, ckpt=None, **extra):
    from vllm.engine.arg_utils import EngineArgs

    from flas_vllm.engine.plugin import register

    register()
    kwargs = flas_engine_kwargs(model, ckpt, **extra) if ckpt is not None else {"model": str(model), **extra}
    return EngineArgs(**kwargs).create_engine_config()


@pytest.mark.parametrize("setting, value", [
    ("tensor_parallel_size", 2), ("pipeline_parallel_size", 2), ("enable_dbo", True), ("ubatch_size", 2),
])
def test_unsupported_parallelism_is_refused_naming_the_setting(tiny_model, ckpt, setting, value):
    with pytest.raises(FlasConfigError, match=f"^{setting}={value}: flas-vllm"):
        _config(tiny_model, ckpt, **{setting: value})


def test_plain_models_are_left_alone(tiny_model, monkeypatch):
    """No FLAS check, no FLAS runner preference, no fingerprint: vLLM's behaviour for every other model."""
    config = _config(tiny_model, tensor_parallel_size=2)
    assert config.parallel_config.tensor_parallel_size == 2
    assert config._get_v2_model_runner_unsupported_features() == []
    assert not hasattr(config.model_config.hf_config, "flas_fingerprint")
    monkeypatch.setenv(V2, "1")
    with pytest.raises(Exception, match="Triton") as info:  # vLLM's own CPU refusal, not ours
        _config(tiny_model)
    assert not isinstance(info.value, FlasConfigError)


def test_plugin_sets_no_process_wide_runner_choice(monkeypatch):
    from flas_vllm.engine import plugin

    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    assert V2 not in os.environ


def test_where_v2_is_the_default_only_the_flas_engine_gets_v1(tiny_model, ckpt, monkeypatch):
    """On a GPU (Triton present) vLLM picks V2 unless a feature needs V1; FLAS is such a feature, for itself."""
    import vllm.config.vllm as vllm_config_module

    flas, plain = _config(tiny_model, ckpt), _config(tiny_model)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    assert flas.use_v2_model_runner is False
    assert "FLAS steering (FlasGemma2ForCausalLM)" in flas._get_v2_model_runner_unsupported_features()
    assert plain.use_v2_model_runner is True


def test_v2_asked_for_by_the_user_is_refused_before_the_engine(tiny_model, ckpt, monkeypatch):
    monkeypatch.setenv(V2, "1")
    with pytest.raises(FlasConfigError, match=f"{V2}=1 is set.*unsteered.*Set {V2}=0"):
        _config(tiny_model, ckpt)


def test_v2_forced_by_an_option_is_refused_in_the_worker_too(tiny_model, ckpt, monkeypatch):
    """Watermarking or HiSparse select V2 even over VLLM_USE_V2_MODEL_RUNNER=0; the model must not start."""
    from vllm.config import VllmConfig

    from flas_vllm.engine.checks import check_runner

    config = _config(tiny_model, ckpt)
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(FlasConfigError, match=f"only V2 supports forced it.*Set {V2}=0"):
        check_runner(config)


def test_a_v1_runner_without_the_flas_hook_is_refused(tiny_model, ckpt, monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from flas_vllm.engine.checks import check_runner

    config = _config(tiny_model, ckpt)
    check_runner(config)
    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", GPUModelRunner._prepare_inputs.__wrapped__)
    with pytest.raises(FlasConfigError, match="VLLM_PLUGINS.*unsteered"):
        check_runner(config)


def test_compile_cache_key_follows_the_checkpoint_contents(tiny_model, make_ckpt, tmp_path):
    """Same path, same options, new weights in place: vLLM's config hash (its compile-cache key) must change."""
    from vllm.compilation.caching import aot_compile_hash_factors

    other = make_ckpt(seed=1)
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(make_ckpt(), ckpt_dir)
    weights = next(ckpt_dir.glob("*.safetensors"))

    first = _config(tiny_model, ckpt_dir)
    again = _config(tiny_model, ckpt_dir)
    shutil.copyfile(next(other.glob("*.safetensors")), weights)
    replaced = _config(tiny_model, ckpt_dir)

    assert first.compute_hash() == again.compute_hash()
    assert replaced.compute_hash() != first.compute_hash()
    assert aot_compile_hash_factors(replaced) != aot_compile_hash_factors(first)


def test_worker_refuses_a_checkpoint_that_changed_after_the_key_was_made(tiny_model, ckpt):
    from flas_vllm.engine.checks import check_fingerprint

    hf_config = _config(tiny_model, ckpt).model_config.hf_config
    check_fingerprint(hf_config, hf_config.flas_fingerprint)
    with pytest.raises(FlasCheckpointError, match="changed while the engine started"):
        check_fingerprint(hf_config, "0" * 16)


def test_serve_refuses_tensor_parallel_before_starting_an_engine(tiny_model, ckpt):
    cmd = [sys.executable, "-m", "flas_vllm.cli", "serve", str(tiny_model), "--flas-checkpoint", str(ckpt),
           "--tensor-parallel-size", "2", "--port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).replace("\u2502", " ").split())  # rich wraps errors in a box
    assert proc.returncode == 2, out[-3000:]  # a usage error, not a crash
    assert "tensor_parallel_size=2: flas-vllm supports tensor_parallel_size=1 only" in out
    assert "Traceback" not in out and "EngineCore" not in out and "Loading weights" not in out, out[-3000:]
