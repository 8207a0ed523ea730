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
    """Shows a record with the `vllm` logger's handlers, as they are when it is emitted (vLLM configures
    them when an engine starts, and again from the server's arguments), where nothing else would.

    The record still propagates: where the application gave the root logger handlers (its logging
    setup, pytest's capture), they show it and this handler does nothing. Where neither has any (no
    engine yet in this process), it goes where Python would send it: the last-resort handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        handlers = logging.getLogger(VLLM_LOGGER).handlers or [logging.lastResort]
        for handler in handlers:
            if handler is not None and record.levelno >= handler.level:
                handler.handle(record)


def route_flas_logs_to_vllm() -> bool:
    """Route the `flas_vllm` logger as above, at VLLM_LOGGING_LEVEL; returns whether it did.

    Left alone where vLLM leaves logging alone (VLLM_CONFIGURE_LOGGING=0) and where the logger already
    has a handler (routed before, or configured by the application)."""
    import vllm.envs as envs  # lazy: vllm is heavy

    flas_logger = logging.getLogger(FLAS_LOGGER)
    if not envs.VLLM_CONFIGURE_LOGGING or flas_logger.handlers:
        return False
    flas_logger.addHandler(ToVllmHandlers())
    flas_logger.setLevel(envs.VLLM_LOGGING_LEVEL)
    return True
