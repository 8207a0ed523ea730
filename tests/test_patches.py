"""The vLLM patches apply to the supported vLLM and refuse other versions (upstream drift: tests/test_compat.py)."""

from __future__ import annotations

import pytest

patches = pytest.importorskip("flas_vllm.engine.patches")


def test_install_all_is_idempotent_and_marks_wrappers():
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
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
        (GPUModelRunner, "_sample"),
        (GPUModelRunner, "_bookkeeping_sync"),
        (EngineArgs, "create_engine_config"),
        (VllmConfig, "_get_v2_model_runner_unsupported_features"),
        (GPUModelRunner, "_dummy_run"),
        (V2ModelRunner, "_dummy_run"),
    ]:
        fn = getattr(owner, name)
        assert getattr(fn, "__flas_patched__", False), f"{owner.__name__}.{name} is not patched"


def test_cpu_runner_inherits_the_hook():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    patches.install_all()
    assert getattr(CPUModelRunner._prepare_inputs, "__flas_patched__", False)


def test_dummy_runs_run_inside_the_models_profiling_context():
    """Both runners' `_dummy_run` (profiling, warm-up) runs inside `flas_profiling()`; other models untouched."""
    import contextlib

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.install_all()
    seen = []

    class Model:
        @contextlib.contextmanager
        def flas_profiling(self):
            seen.append("enter")
            yield
            seen.append("exit")

    def original(self, n, **kw):
        seen.append(("run", n, kw))
        return "out"

    for runner_cls in (GPUModelRunner, V2ModelRunner):
        assert getattr(runner_cls._dummy_run, "__flas_patched__", False), runner_cls
        runner = object.__new__(runner_cls)
        runner.model = Model()
        seen.clear()
        wrapper = patches.dummy_runs._make(original)
        assert wrapper(runner, 7, is_profile=True) == "out"
        assert seen == ["enter", ("run", 7, {"is_profile": True}), "exit"], runner_cls
        runner.model = object()  # not a FLAS model: no context
        seen.clear()
        wrapper(runner, 3)
        assert seen == [("run", 3, {})]


def test_other_vllm_versions_are_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(patches.UnsupportedVllmVersion, match="0.32.0"):
        patches.check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.31.9")
    with pytest.raises(patches.UnsupportedVllmVersion):
        patches.check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(patches.UnsupportedVllmVersion):
        patches.check_vllm_version()
    for accepted in ("0.32.0+cpu", "0.33.0", "0.33.1"):
        monkeypatch.setattr(vllm, "__version__", accepted)
        patches.check_vllm_version()


def test_wrap_once_refuses_a_vanished_function():
    class Owner:
        pass

    with pytest.raises(patches.UnsupportedVllmVersion, match="no longer exists"):
        patches.wrap_once(Owner, "missing", lambda f: f)


def test_cpu_seeded_rewind_restores_the_exact_generator_state():
    """The wrappers on a minimal runner: sampling consumes randomness, the discarded row gets it back."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from flas_vllm.engine.patches import cpu_seeded_rewind

    def sample(runner):  # what the sampler does with per-request generators
        return [torch.rand(3, generator=g) for g in runner.input_batch.generators.values()]

    def bookkeeping(runner):  # upstream's loop, verbatim in spirit: raises on a CPU generator
        for i in np.nonzero(runner.discard_request_mask.np[: runner.input_batch.num_reqs])[0]:
            gen = runner.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        return "done"

    gens = {0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}
    runner = SimpleNamespace(input_batch=SimpleNamespace(generators=gens, num_reqs=3),
                             discard_request_mask=SimpleNamespace(np=np.array([True, False, True])))
    with pytest.raises(RuntimeError, match="offset"):
        bookkeeping(runner)
    fresh0, fresh1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    cpu_seeded_rewind._make_sample(sample)(runner)
    assert cpu_seeded_rewind._make_bookkeeping(bookkeeping)(runner) == "done"
    assert set(runner.input_batch.generators) == {0, 1}  # hidden only during bookkeeping
    assert torch.equal(torch.rand(3, generator=gens[0]), torch.rand(3, generator=fresh0))  # rewound
    torch.rand(3, generator=fresh1)
    assert torch.equal(torch.rand(3, generator=gens[1]), torch.rand(3, generator=fresh1))  # advanced


def _scheduler_with(inflight_steering, max_num_seqs: int, max_concepts: int = 8):
    """A stand-in scheduler for the admission wrappers: its requests, one per steering, all running."""
    from types import SimpleNamespace

    from vllm.v1.request import RequestStatus

    from flas_vllm.core.steering import WIRE_KEY, parse_steering

    def request(rid, steer):
        extra = {WIRE_KEY: parse_steering(steer).to_wire()} if steer else {WIRE_KEY: {}}
        return SimpleNamespace(request_id=rid, status=RequestStatus.RUNNING, num_preemptions=0, num_computed_tokens=1,
                               sampling_params=SimpleNamespace(extra_args=extra))

    hf_config = SimpleNamespace(flas={"checkpoint": "c", "max_concepts": max_concepts})
    scheduler = SimpleNamespace(
        requests={f"r{i}": request(f"r{i}", s) for i, s in enumerate(inflight_steering)},
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config),
                                    scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs)),
        grammar_compile_error_reqs=set())
    return scheduler, request


def test_a_request_with_a_new_step_size_waits_while_the_time_table_is_full():
    """The worker's time table has max_num_seqs rows, one per step size in flight; preempted requests keep
    theirs. A waiting request with a new (flowtime, n_steps) waits while they are all held (it would need a
    row), one with a step size in flight or unsteered does not; concepts are limited as before."""
    from flas_vllm.core.steering import steering
    from flas_vllm.engine.patches.scheduler_admission import _make_gate, _make_schedule

    schedule = _make_schedule(lambda self: "scheduled")
    may_start = _make_gate(lambda self, request: True)
    held = [steering("pirates", 1.0), steering("cats", 2.0, n_steps=2)]
    scheduler, request = _scheduler_with(held, max_num_seqs=2)
    assert schedule(scheduler) == "scheduled"
    assert may_start(scheduler, request("same", steering("dogs", 1.0)))  # step size in flight, new concept
    assert may_start(scheduler, request("plain", None))
    assert not may_start(scheduler, request("new", steering("pirates", 3.0)))  # a third step size: no row
    assert not may_start(scheduler, request("new-n", steering("pirates", 2.0)))  # (2.0, default) is not (2.0, 2)
    assert scheduler._flas_deferred == 2
    scheduler, request = _scheduler_with(held, max_num_seqs=3)  # a free row: it starts, and takes the row
    schedule(scheduler)
    assert may_start(scheduler, request("new", steering("pirates", 3.0)))
    assert not may_start(scheduler, request("newer", steering("pirates", 4.0)))
    scheduler, request = _scheduler_with(held, max_num_seqs=8, max_concepts=2)  # concepts: as before
    schedule(scheduler)
    assert not may_start(scheduler, request("third-concept", steering("dogs", 1.0)))
    assert may_start(scheduler, request("known-concept", steering("cats", 4.0)))
