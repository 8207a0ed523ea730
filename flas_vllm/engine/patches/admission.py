"""Front end: validate steering fields and salt the prefix cache, before the engine sees a request.

Wraps `InputProcessor.process_inputs` (its async twin calls it), which the offline
`LLM`, `AsyncLLM` and the OpenAI server all go through. A bad flas_* field
raises an error that is both vLLM's own `VLLMValidationError` naming the field
(so the server answers HTTP 400) and a `SteeringParamError` (a ValueError), and
the engine never receives the request. A steered request's
`cache_salt` gets a digest of (concept, flowtime, n_steps, checkpoint
fingerprint), combined with any salt the user set.
"""

from __future__ import annotations

import dataclasses
import functools

from . import wrap_once
from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.errors import SteeringParamError
from flas_vllm.core.steering import parse_steering, STOP_RULE_KEY, parse_stop_rule, cache_salt, WIRE_KEY

_FRONT_END: dict = {}  # FlasEngineOptions -> ((default n_steps, max n_steps), fingerprint), once per process


def _flas_context(input_processor):
    """(options, (default n_steps, max n_steps), fingerprint) for a FLAS model, None for any other model."""
    hf_config = input_processor.model_config.hf_config
    if getattr(hf_config, "flas", None) is None:
        return None
    options = FlasEngineOptions.from_hf_config(hf_config)  # parsed once per process (cached)
    known = _FRONT_END.get(options)
    if known is None:  # the front end needs the fingerprint and config only: no tensor is loaded here
        from flas_vllm.core.checkpoint import checkpoint_fingerprint, read_checkpoint_config  # lazy: torch, via core.checkpoint

        n_steps = read_checkpoint_config(options.checkpoint).n_steps
        known = _FRONT_END[options] = (options.step_limits(n_steps), checkpoint_fingerprint(options.checkpoint))
    return (options, *known)


def _check(input_processor, params):
    ctx = _flas_context(input_processor)
    extra = getattr(params, "extra_args", None)
    if ctx is None:
        if extra and any(str(k).startswith("flas_") for k in extra):
            key = next(k for k in extra if str(k).startswith("flas_"))
            raise _validation_error_cls()(
                key, f"{key}: flas_* steering fields were sent to a model that is not a FLAS model "
                "(start it with a FLAS checkpoint)",
            )
        return None, None
    options, (default_steps, max_steps), fingerprint = ctx
    try:
        steer = parse_steering(extra, max_flowtime=options.max_flowtime,
                               max_concept_bytes=options.max_concept_bytes, max_n_steps=max_steps)
    except SteeringParamError as exc:
        raise _validation_error_cls()(exc.field, str(exc)) from None
    n_steps = default_steps if steer is None or steer.n_steps is None else steer.n_steps
    return steer, (n_steps, fingerprint)


def _apply_stop_rule(input_processor, params):
    """`flas_stop_rule: original`: stop only at the tokenizer's EOS (not generation_config's other ids).

    vLLM adds generation_config's EOS ids to `stop_token_ids` unless `ignore_eos`; so the request
    gets `ignore_eos` with the tokenizer's EOS as its one added stop id. Returns the params to use.
    """
    extra = getattr(params, "extra_args", None)
    if not extra or STOP_RULE_KEY not in extra or parse_stop_rule(extra) != "original":
        return params
    if params.ignore_eos:
        raise _validation_error_cls()(STOP_RULE_KEY, f"{STOP_RULE_KEY}: 'original' stops at EOS, which "
                                      "contradicts ignore_eos=True; drop one of them")
    tokenizer = getattr(input_processor, "tokenizer", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise _validation_error_cls()(STOP_RULE_KEY, f"{STOP_RULE_KEY}: 'original' needs a tokenizer EOS id, "
                                      "and this model's tokenizer has none")
    params = params.clone()
    params.ignore_eos = True
    params.stop_token_ids = list(dict.fromkeys([*(params.stop_token_ids or []), int(eos)]))
    return params


_VALIDATION_ERROR = None


def _validation_error_cls():
    """`SteeringValidationError`: vLLM's VLLMValidationError AND flas-vllm's SteeringParamError.

    VLLMValidationError (HTTP 400 naming the parameter on the server) is not a
    ValueError in vLLM 0.32, while offline users catch ValueError /
    SteeringParamError. One class serves both. Built lazily: vLLM is imported
    only once the patches install.
    """
    global _VALIDATION_ERROR
    if _VALIDATION_ERROR is None:
        from vllm.exceptions import VLLMValidationError  # lazy: vllm; patches install only inside vLLM

        class SteeringValidationError(VLLMValidationError, SteeringParamError):
            def __init__(self, field: str, message: str):
                # Both bases' __init__ chain through super(); set their state directly instead.
                Exception.__init__(self, message)
                self.field = field
                self.parameter = field
                self.value = None

        SteeringValidationError.__module__ = __name__
        _VALIDATION_ERROR = SteeringValidationError
    return _VALIDATION_ERROR


def _salt(request, steer, ctx) -> None:
    if steer is None:
        return
    n_steps, fingerprint = ctx
    request.cache_salt = cache_salt(steer, n_steps=n_steps, fingerprint=fingerprint, user_salt=request.cache_salt)


def _attach_wire_form(params, steer, ctx):
    """Leave the validated steering on the request, n_steps resolved (the engine core and the worker
    decode it, never re-validate); a client-sent `_flas` is always overwritten. Returns the params to
    use (a copy when changed)."""
    extra = getattr(params, "extra_args", None)
    if not extra or not any(str(k).startswith(("flas_", WIRE_KEY)) for k in extra):
        return params
    n_steps, _ = ctx
    params = params.clone()
    wire = {} if steer is None else dataclasses.replace(steer, n_steps=n_steps).to_wire()
    params.extra_args = {**params.extra_args, WIRE_KEY: wire}
    return params


def _make_sync(original):
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        steer, ctx = _check(self, params)
        if ctx is not None:
            params = _attach_wire_form(_apply_stop_rule(self, params), steer, ctx)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        _salt(request, steer, ctx)
        return request

    return process_inputs


def install() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor  # lazy: vllm; patches install only inside vLLM

    # process_inputs_async is built per instance from self.process_inputs, so it sees this wrapper.
    return wrap_once(InputProcessor, "process_inputs", _make_sync)
