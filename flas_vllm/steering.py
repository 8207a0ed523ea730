"""Per-request steering fields: how users ask for them and how they are checked at admission.

A request is steered through `SamplingParams.extra_args` (OpenAI: `vllm_xargs`)
with `flas_concept` and `flas_flowtime`. Validation runs in the front end,
before the engine sees the request, so a bad field is an error for that request
only. The same fields, with the checkpoint fingerprint and n_steps, give the
prefix-cache salt that keeps differently steered KV apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from flas_vllm.errors import SteeringParamError

CONCEPT_KEY = "flas_concept"
FLOWTIME_KEY = "flas_flowtime"
KNOWN_KEYS = (CONCEPT_KEY, FLOWTIME_KEY)
DEFAULT_MAX_FLOWTIME = 8.0
MAX_CONCEPT_BYTES = 2048


def steering(concept: str, flowtime: float) -> dict[str, Any]:
    """The `extra_args` (or `vllm_xargs`) that steer one request toward `concept` at `flowtime`."""
    return {CONCEPT_KEY: concept, FLOWTIME_KEY: flowtime}


@dataclass(frozen=True)
class Steering:
    concept: str
    flowtime: float


def parse_steering(
    extra_args: Mapping[str, Any] | None,
    *,
    max_flowtime: float = DEFAULT_MAX_FLOWTIME,
    max_concept_bytes: int = MAX_CONCEPT_BYTES,
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
    has_c, has_t = CONCEPT_KEY in extra_args, FLOWTIME_KEY in extra_args
    if not has_c and not has_t:
        return None
    if has_c != has_t:
        missing = FLOWTIME_KEY if has_c else CONCEPT_KEY
        raise SteeringParamError(missing, f"is required when {CONCEPT_KEY if has_c else FLOWTIME_KEY} is given")
    concept, flowtime = extra_args[CONCEPT_KEY], extra_args[FLOWTIME_KEY]
    if not isinstance(concept, str):
        raise SteeringParamError(CONCEPT_KEY, f"must be a string, got {type(concept).__name__}")
    if not concept.strip():
        raise SteeringParamError(CONCEPT_KEY, "must be a non-empty string")
    size = len(concept.encode("utf-8"))
    if size > max_concept_bytes:
        raise SteeringParamError(
            CONCEPT_KEY, f"is {size} bytes long; the limit is {max_concept_bytes} bytes (UTF-8)"
        )
    if isinstance(flowtime, bool) or not isinstance(flowtime, (int, float)):
        raise SteeringParamError(FLOWTIME_KEY, f"must be a number, got {type(flowtime).__name__}")
    flowtime = float(flowtime)
    if not math.isfinite(flowtime):
        raise SteeringParamError(FLOWTIME_KEY, f"must be finite, got {flowtime}")
    if not 0.0 <= flowtime <= max_flowtime:
        raise SteeringParamError(
            FLOWTIME_KEY, f"must be within [0, {max_flowtime}] (max_flowtime), got {flowtime}"
        )
    if flowtime == 0.0:
        return None  # T = 0 leaves h unchanged: served exactly as unsteered
    return Steering(concept=concept, flowtime=flowtime)


def cache_salt(steer: Steering, *, n_steps: int, fingerprint: str, user_salt: str | None) -> str:
    """Prefix-cache salt: identical steering shares KV, anything else never does."""
    key = json.dumps([steer.concept, repr(steer.flowtime), n_steps, fingerprint])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"{user_salt}|flas:{digest}" if user_salt else f"flas:{digest}"
