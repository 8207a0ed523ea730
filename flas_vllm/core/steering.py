"""Per-request steering fields: how users ask for them and how they are checked at admission.

A request is steered through `SamplingParams.extra_args` (OpenAI: `vllm_xargs`)
with `flas_concept` and `flas_flowtime`. Validation runs in the front end,
before the engine sees the request, so a bad field is an error for that request
only. The same fields, with the checkpoint fingerprint and n_steps, give the
prefix-cache salt that keeps differently steered KV apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from flas_vllm.core.config import ENGINE_OPTION_DEFAULTS
from flas_vllm.core.errors import SteeringParamError

CONCEPT_KEY = "flas_concept"
FLOWTIME_KEY = "flas_flowtime"
N_STEPS_KEY = "flas_n_steps"
STOP_RULE_KEY = "flas_stop_rule"
KNOWN_KEYS = (CONCEPT_KEY, FLOWTIME_KEY, N_STEPS_KEY, STOP_RULE_KEY)
STOP_RULES = ("vllm", "original")
"""`vllm`: stop at every id of generation_config.eos_token_id (vLLM's rule; Gemma-2-IT: <eos> and
<end_of_turn>). `original`: stop only at the tokenizer's <eos>, as the original FLAS generator does,
so text after <end_of_turn> is kept and judged (spec 6)."""
DEFAULT_MAX_FLOWTIME = ENGINE_OPTION_DEFAULTS["max_flowtime"]
MAX_CONCEPT_BYTES = ENGINE_OPTION_DEFAULTS["max_concept_bytes"]


def steering(concept: str, flowtime: float, n_steps: int | None = None,
             stop_rule: str | None = None) -> dict[str, Any]:
    """The `extra_args` (or `vllm_xargs`) that steer one request toward `concept` at `flowtime`.

    `n_steps`: this request's Euler steps (default: the engine's); `stop_rule`: see STOP_RULES.
    """
    out: dict[str, Any] = {CONCEPT_KEY: concept, FLOWTIME_KEY: flowtime}
    if n_steps is not None:
        out[N_STEPS_KEY] = n_steps
    if stop_rule is not None:
        out[STOP_RULE_KEY] = stop_rule
    return out


WIRE_KEY = "_flas"
"""Where the front end leaves a request's validated steering (`Steering.to_wire()`) for the engine
core and the worker, in `extra_args`; {} marks a validated unsteered request."""


@dataclass(frozen=True)
class Steering:
    """One request's validated steering: built by `parse_steering` in the front end, sent to the
    engine core and the worker as `to_wire()` under WIRE_KEY, decoded there by `from_request`."""

    concept: str
    flowtime: float
    n_steps: int | None = None  # None: the engine's default (the front end resolves it before sending)

    def to_wire(self) -> dict[str, Any]:
        """The plain dict that crosses the process boundary (every field, as validated)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, form: Mapping[str, Any]) -> "Steering | None":
        """Decode `to_wire()`'s dict ({} -> unsteered); no re-validation: the front end validated it."""
        return cls(**form) if form else None

    @classmethod
    def from_request(cls, extra_args: Mapping[str, Any] | None) -> "Steering | None":
        """The steering the front end validated and attached to a request's `extra_args`.

        A request with flas_* fields but no wire form did not pass the front end: it is an
        error for that request (SteeringParamError), never served unsteered.
        """
        if not extra_args:
            return None
        form = extra_args.get(WIRE_KEY)
        if form is None:
            flas_keys = sorted(k for k in extra_args if str(k).startswith("flas_"))
            if flas_keys:
                raise SteeringParamError(flas_keys[0], "reached the engine without the FLAS front end's "
                                                       "validation (is the flas_vllm plugin loaded in the API process?)")
            return None
        if not isinstance(form, Mapping):
            raise SteeringParamError(WIRE_KEY, f"malformed wire form of a steering record: {form!r}")
        return cls.from_wire(form)


def check_stop_rule(rule: Any, *, field: str = STOP_RULE_KEY) -> str:
    if rule not in STOP_RULES:
        raise SteeringParamError(field, f"must be one of {', '.join(STOP_RULES)}, got {rule!r}")
    return rule


def check_n_steps(n: Any, max_n_steps: int | None, *, field: str = N_STEPS_KEY) -> int:
    """A request's Euler steps: an integer in [1, max_n_steps] (no upper limit when None)."""
    limit = f"[1, {max_n_steps}] (the engine's max_n_steps)" if max_n_steps else ">= 1"
    if isinstance(n, bool) or not isinstance(n, int):
        raise SteeringParamError(field, f"must be an integer within {limit}, got {n!r}")
    if n < 1 or (max_n_steps is not None and n > max_n_steps):
        raise SteeringParamError(field, f"must be within {limit}, got {n}")
    return n


def check_concept(concept: Any, max_concept_bytes: int = MAX_CONCEPT_BYTES, *, field: str = CONCEPT_KEY) -> str:
    """A concept: a non-empty string of at most `max_concept_bytes` UTF-8 bytes."""
    if not isinstance(concept, str):
        raise SteeringParamError(field, f"must be a string, got {type(concept).__name__}")
    if not concept.strip():
        raise SteeringParamError(field, "must be a non-empty string")
    size = len(concept.encode("utf-8"))
    if size > max_concept_bytes:
        raise SteeringParamError(field, f"is {size} bytes long; the limit is {max_concept_bytes} bytes (UTF-8)")
    return concept


def check_flowtime(flowtime: Any, max_flowtime: float = DEFAULT_MAX_FLOWTIME, *, field: str = FLOWTIME_KEY) -> float:
    """A flowtime: a finite number in [0, max_flowtime] (the limit is shown as given)."""
    if isinstance(flowtime, bool) or not isinstance(flowtime, (int, float)):
        raise SteeringParamError(field, f"must be a number, got {type(flowtime).__name__}")
    flowtime = float(flowtime)
    if not (math.isfinite(flowtime) and 0.0 <= flowtime <= max_flowtime):
        raise SteeringParamError(field, f"must be within [0, {max_flowtime}] (max_flowtime), a finite number; "
                                        f"got {flowtime}")
    return flowtime


def parse_stop_rule(extra_args: Mapping[str, Any] | None) -> str:
    """The request's stop rule ('vllm' unless it asks for the original's)."""
    return check_stop_rule((extra_args or {}).get(STOP_RULE_KEY, "vllm"))


def parse_steering(
    extra_args: Mapping[str, Any] | None,
    *,
    max_flowtime: float = DEFAULT_MAX_FLOWTIME,
    max_concept_bytes: int = MAX_CONCEPT_BYTES,
    max_n_steps: int | None = None,
) -> Steering | None:
    """Validate the flas_* fields; None means unsteered (no keys, or flowtime 0).

    Raises SteeringParamError naming the field and the limit.
    """
    if not extra_args:
        return None
    unknown = sorted(k for k in extra_args if str(k).startswith("flas_") and k not in KNOWN_KEYS)
    if unknown:
        raise SteeringParamError(
            unknown[0], f"unknown steering field; the accepted fields are {', '.join(KNOWN_KEYS)}"
        )
    parse_stop_rule(extra_args)
    n_steps = check_n_steps(extra_args[N_STEPS_KEY], max_n_steps) if N_STEPS_KEY in extra_args else None
    has_c, has_t = CONCEPT_KEY in extra_args, FLOWTIME_KEY in extra_args
    if not has_c and not has_t:
        if n_steps is not None:
            raise SteeringParamError(N_STEPS_KEY, f"needs {CONCEPT_KEY} and {FLOWTIME_KEY}")
        return None
    if has_c != has_t:
        missing = FLOWTIME_KEY if has_c else CONCEPT_KEY
        raise SteeringParamError(missing, f"is required when {CONCEPT_KEY if has_c else FLOWTIME_KEY} is given")
    concept = check_concept(extra_args[CONCEPT_KEY], max_concept_bytes)
    flowtime = check_flowtime(extra_args[FLOWTIME_KEY], max_flowtime)
    if flowtime == 0.0:
        return None  # T = 0 leaves h unchanged: served exactly as unsteered
    return Steering(concept=concept, flowtime=flowtime, n_steps=n_steps)


def cache_salt(steer: Steering, *, n_steps: int, fingerprint: str, user_salt: str | None) -> str:
    """Prefix-cache salt: identical steering shares KV, anything else never does."""
    key = json.dumps([steer.concept, repr(steer.flowtime), n_steps, fingerprint])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"{user_salt}|flas:{digest}" if user_salt else f"flas:{digest}"
