"""The vLLM patches apply to the pinned vLLM and refuse other versions; they break loudly if upstream moves."""

from __future__ import annotations

import inspect

import pytest

patches = pytest.importorskip("flas_vllm.patches")


def test_install_all_is_idempotent_and_marks_wrappers():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.install_all()
    first = GPUModelRunner._prepare_inputs
    patches.install_all()
    assert GPUModelRunner._prepare_inputs is first  # not wrapped twice
    for owner, name in [
        (GPUModelRunner, "_prepare_inputs"),
        (InputProcessor, "process_inputs"),
        (Scheduler, "schedule"),
        (Scheduler, "_handle_blocked_waiting_request"),
    ]:
        fn = getattr(owner, name)
        assert getattr(fn, "__flas_patched__", False), f"{owner.__name__}.{name} is not patched"


def test_cpu_runner_inherits_the_hook():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    patches.install_all()
    assert getattr(CPUModelRunner._prepare_inputs, "__flas_patched__", False)


@pytest.mark.parametrize(
    "owner_path, name, expected",
    [
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs",
         ["self", "scheduler_output", "num_scheduled_tokens"]),
        ("vllm.v1.engine.input_processor:InputProcessor", "process_inputs",
         ["self", "request_id", "prompt", "params"]),
        ("vllm.v1.core.sched.scheduler:Scheduler", "_handle_blocked_waiting_request", ["self", "request"]),
    ],
)
def test_upstream_signatures_are_what_the_patches_were_written_for(owner_path, name, expected):
    """If vLLM renames or reorders these arguments, the patches would pass the wrong things."""
    import importlib

    module, cls = owner_path.split(":")
    fn = getattr(getattr(importlib.import_module(module), cls), name)
    fn = getattr(fn, "__wrapped__", fn)
    params = list(inspect.signature(fn).parameters)
    assert params[: len(expected)] == expected


def test_async_front_end_goes_through_the_patched_process_inputs():
    """AsyncLLM (the OpenAI server) calls process_inputs_async, built per instance from process_inputs."""
    from vllm.v1.engine import input_processor

    source = inspect.getsource(input_processor.InputProcessor.__init__)
    assert "self.process_inputs_async = make_async(" in source and "self.process_inputs," in source


def test_runner_hook_reads_fields_that_exist_on_the_v1_runner():
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "req_ids" in dir(InputBatch) and "num_reqs" in dir(InputBatch)
    assert hasattr(GPUModelRunner, "get_model")


def test_other_vllm_versions_are_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(patches.UnsupportedVllmVersion, match="0.32.0"):
        patches.check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.31.9")
    with pytest.raises(patches.UnsupportedVllmVersion):
        patches.check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    patches.check_vllm_version()


def test_wrap_once_refuses_a_vanished_function():
    class Owner:
        pass

    with pytest.raises(patches.UnsupportedVllmVersion, match="no longer exists"):
        patches.wrap_once(Owner, "missing", lambda f: f)
