"""FLAS's log records are shown where vLLM's are.

vLLM configures only its own `vllm` logger (its handler and level, no propagation), when an engine
starts. A `flas_vllm` record fell through to Python's last-resort handler, which shows WARNING and
up, so the engine's INFO line naming the checkpoint, its fingerprint and the flow's KV layers was
never shown.
"""

from __future__ import annotations

import logging

FLAS_LOGGER = "flas_vllm"
VLLM_LOGGER = "vllm"


class ToVllmHandlers(logging.Handler):
    """Passes each record on, at the level of where it goes, decided when it is emitted (vLLM configures
    its logger when an engine starts, again from the server's arguments, and `--log-level` changes it):
    - the root logger, where the application gave it handlers (its logging setup, pytest's capture);
    - else the `vllm` logger, once vLLM has configured it;
    - else Python's last-resort handler (WARNING and up), as if nothing had been routed."""

    def emit(self, record: logging.LogRecord) -> None:
        root, vllm_logger = logging.getLogger(), logging.getLogger(VLLM_LOGGER)
        target = root if root.handlers else vllm_logger if vllm_logger.handlers else None
        if target is not None:
            if target.isEnabledFor(record.levelno):
                target.handle(record)
        elif logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def route_flas_logs_to_vllm() -> bool:
    """Route the `flas_vllm` logger as above; returns whether it did.

    Left alone where vLLM leaves logging alone (VLLM_CONFIGURE_LOGGING=0) and where the logger already
    has a handler (routed before, or configured by the application)."""
    import vllm.envs as envs  # lazy: vllm is heavy

    flas_logger = logging.getLogger(FLAS_LOGGER)
    if not envs.VLLM_CONFIGURE_LOGGING or flas_logger.handlers:
        return False
    flas_logger.addHandler(ToVllmHandlers())
    flas_logger.setLevel(logging.DEBUG)  # every record reaches the handler, which applies its target's level
    flas_logger.propagate = False  # the handler has passed it on
    return True
