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
    """On a GPU (Triton present) vLLM picks V2 unless a feature needs V1; FLAS asks V1 for itself, by default."""
    import vllm.config.vllm as vllm_config_module

    flas, plain = _config(tiny_model, ckpt), _config(tiny_model)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    assert flas.use_v2_model_runner is False
    entry = f"FLAS steering (FlasGemma2ForCausalLM) unless {V2}=1 is set"
    assert entry in flas._get_v2_model_runner_unsupported_features()
    assert plain.use_v2_model_runner is True


def test_v2_asked_for_by_name_runs_flas_through_its_model_state(tiny_model, ckpt, monkeypatch):
    """VLLM_USE_V2_MODEL_RUNNER=1: the config is accepted and vLLM's own lookup finds FLAS's model state."""
    import vllm.config.vllm as vllm_config_module
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls

    from flas_vllm.engine.checks import check_runner
    from flas_vllm.engine.model import FlasGemma2ForCausalLM
    from flas_vllm.engine.model_state import FlasModelState

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # V2 needs Triton, which vLLM's CPU build lacks
    monkeypatch.setenv(V2, "1")
    config = _config(tiny_model, ckpt)
    assert config.use_v2_model_runner is True
    assert not any("FLAS" in f for f in config._get_v2_model_runner_unsupported_features())
    check_runner(config)  # the worker's check passes: V2 calls the model state, no runner hook needed
    model = FlasGemma2ForCausalLM.__new__(FlasGemma2ForCausalLM)  # the lookup needs the class, not weights
    assert resolve_model_state_cls(config, model) is FlasModelState


def test_v2_forced_by_an_option_is_refused_by_name_unless_asked_for(tiny_model, ckpt, monkeypatch):
    """Watermarking or HiSparse select V2 whatever the default; vLLM's own V2 check then names FLAS and the fix."""
    import vllm.config.vllm as vllm_config_module

    config = _config(tiny_model, ckpt)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    with pytest.raises(ValueError, match=f"FLAS steering \\(FlasGemma2ForCausalLM\\) unless {V2}=1 is set"):
        config._validate_v2_model_runner()
    monkeypatch.setenv(V2, "1")
    config._validate_v2_model_runner()  # asked for by name: V2 runs FLAS


def test_adaptive_draft_verification_is_refused_by_name(tiny_model, ckpt):
    """Its per-request token counts are decided on the device: per-token steering cannot be laid out."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
            "enable_adaptive_verification": True}
    with pytest.raises(FlasConfigError, match="^speculative_config.enable_adaptive_verification=True: flas-vllm"):
        _config(tiny_model, ckpt, speculative_config=spec)


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


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "auto"])
def test_the_flows_kv_layers_skip_kv_cache_quantization(tiny_model, ckpt, kv_cache_dtype):
    """Issue 19, item 3: the flow's paged self-attention layers (indices after the base model's) are on
    vLLM's kv_cache_dtype_skip_layers list, so fp8 KV never stores them with an uncalibrated scale."""
    from flas_vllm.core.checkpoint import read_checkpoint_config

    config = _config(tiny_model, ckpt, kv_cache_dtype=kv_cache_dtype)
    cfg = read_checkpoint_config(ckpt)
    layers = config.model_config.hf_config.num_hidden_layers
    flow = [str(layers + i) for i in range(cfg.n_steps * cfg.num_blocks)]
    assert config.cache_config.cache_dtype == kv_cache_dtype
    assert config.cache_config.kv_cache_dtype_skip_layers == flow
    assert _config(tiny_model, kv_cache_dtype=kv_cache_dtype).cache_config.kv_cache_dtype_skip_layers == []


def test_a_bad_concept_attention_setting_is_refused_before_anything_starts(tiny_model, ckpt, monkeypatch):
    monkeypatch.setenv("FLAS_VLLM_CONCEPT_ATTENTION", "fastest")
    with pytest.raises(FlasConfigError, match="FLAS_VLLM_CONCEPT_ATTENTION='fastest': expected one of gather, flex"):
        _config(tiny_model, ckpt)
    monkeypatch.setenv("FLAS_VLLM_CONCEPT_ATTENTION", "flex")
    _config(tiny_model, ckpt)  # a valid choice starts (on CPU the gather is used whatever it says)


def test_compile_cache_key_follows_the_concept_attention_choice(tiny_model, ckpt, monkeypatch):
    """The choice decides which op a traced graph holds: a graph cached under the other one must not load."""
    from vllm.compilation.caching import aot_compile_hash_factors

    configs = {}
    for choice in ("gather", "flex"):
        monkeypatch.setenv("FLAS_VLLM_CONCEPT_ATTENTION", choice)
        configs[choice] = _config(tiny_model, ckpt)
        assert configs[choice].model_config.hf_config.flas_concept_attention == choice
    assert configs["gather"].compute_hash() != configs["flex"].compute_hash()
    assert _config(tiny_model, ckpt).compute_hash() == configs["flex"].compute_hash()  # the same choice: the same key
    assert aot_compile_hash_factors(configs["gather"]) != aot_compile_hash_factors(configs["flex"])


def test_serve_passes_flow_graphs_to_the_engine_and_refuses_other_values(tiny_model, ckpt, monkeypatch, capsys):
    from flas_vllm.serve.server import build_args

    monkeypatch.setenv("VLLM_PLUGINS", "")  # build_args names FLAS's plugins there; restored after the test
    base = [str(tiny_model), "--flas-checkpoint", str(ckpt), "--port", "0"]
    assert build_args([*base, "--flow-graphs", "bucketed"]).hf_overrides["flas"]["flow_graphs"] == "bucketed"
    assert "flow_graphs" not in build_args(base).hf_overrides["flas"]  # the engine's default
    with pytest.raises(SystemExit) as exit_:
        build_args([*base, "--flow-graphs", "fast"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --flow-graphs: invalid choice: 'fast'" in err and "traced" in err and "bucketed" in err
