"""Engine core: admit a request with a new concept only while a concept slot can hold it.

Like `max_loras`, a waiting request whose concept is not among the in-flight
ones waits while `max_concepts` distinct concepts are in flight (running or
preempted). It never errors and never evicts a concept an in-flight request
still needs. The same holds for step sizes and the worker's time table
(engine/time_table.py, a row per step size in flight): a request with a new
(flowtime, n_steps) waits while the table's rows are all held, which only
preempted requests can bring about. Wraps `Scheduler.schedule` (to snapshot
what is in flight once per step) and `Scheduler._handle_blocked_waiting_request`
(the per-request "may this one start now?" check).
"""

from __future__ import annotations

import functools
import logging

from . import wrap_once
from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.errors import SteeringParamError
from flas_vllm.core.steering import Steering
from flas_vllm.engine.time_table import time_table_rows

logger = logging.getLogger("flas_vllm")


def _limits(scheduler):
    cached = getattr(scheduler, "_flas_max_concepts", False)
    if cached is False:
        cached = None
        hf_config = scheduler.vllm_config.model_config.hf_config
        if getattr(hf_config, "flas", None) is not None:
            cached = FlasEngineOptions.from_hf_config(hf_config)
        scheduler._flas_max_concepts = cached
    return cached


_INVALID = object()


def _steering(request):
    """The request's steering (None if unsteered), decoded from the front end's wire form and
    remembered on the request; _INVALID if the request carries flas_* fields the front end never saw."""
    cached = getattr(request, "_flas_steering", False)
    if cached is not False:
        return cached
    params = request.sampling_params
    try:
        request._flas_steering = Steering.from_request(params.extra_args if params else None)
    except SteeringParamError as exc:
        logger.error("request %s: %s; failing it", request.request_id, exc)
        request._flas_steering = _INVALID
    return request._flas_steering


def _step_size(steer: Steering) -> tuple:
    """What the worker's time table keys on, or finer: two keys may share a step size, never the reverse."""
    return steer.flowtime, steer.n_steps


def _make_schedule(original):
    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        options = _limits(self)
        if options is not None:
            from vllm.v1.request import RequestStatus  # lazy: vllm; patches install only inside vLLM

            inflight, steps = set(), set()
            for req in self.requests.values():
                if req.status == RequestStatus.RUNNING or req.num_preemptions > 0 or req.num_computed_tokens > 0:
                    steer = _steering(req)
                    if steer is not None and steer is not _INVALID:
                        inflight.add(steer.concept)
                        steps.add(_step_size(steer))
            self._flas_inflight, self._flas_inflight_steps = inflight, steps
        return original(self, *args, **kwargs)

    return schedule


def _fail(scheduler, request_id: str) -> None:
    """Finish one request with an error through vLLM's own per-request error set (grammar errors use it):
    a set of ids in 0.32, a dict of id -> RequestError (with the message) in 0.33."""
    errors = scheduler.grammar_compile_error_reqs
    if isinstance(errors, dict):
        from vllm.outputs import RequestError  # lazy: vllm; patches install only inside vLLM

        errors[request_id] = RequestError(code="validation_error", message=(
            "flas_* steering fields reached the engine without the FLAS front end's validation"))
    else:
        errors.add(request_id)


def _make_gate(original):
    @functools.wraps(original)
    def _handle_blocked_waiting_request(self, request):
        if not original(self, request):
            return False
        options = _limits(self)
        inflight = getattr(self, "_flas_inflight", None)
        if options is None or inflight is None:
            return True
        steer = _steering(request)
        if steer is _INVALID:
            # vLLM's own per-request error path (as for a grammar that failed to compile): the request
            # finishes with finish_reason "error" at this step's output; nothing else is affected.
            _fail(self, request.request_id)
            return False
        if steer is None:
            return True
        steps, step = self._flas_inflight_steps, _step_size(steer)
        new_concept, new_step = steer.concept not in inflight, step not in steps
        if ((new_concept and len(inflight) >= options.max_concepts)
                or (new_step and len(steps) >= time_table_rows(self.vllm_config.scheduler_config))):
            self._flas_deferred = getattr(self, "_flas_deferred", 0) + 1
            return False
        inflight.add(steer.concept)
        steps.add(step)
        return True

    return _handle_blocked_waiting_request


def install() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler  # lazy: vllm; patches install only inside vLLM

    done = wrap_once(Scheduler, "schedule", _make_schedule)
    done |= wrap_once(Scheduler, "_handle_blocked_waiting_request", _make_gate)
    return done
