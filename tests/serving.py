"""Start `flas-vllm serve` for a test: a real server process on 127.0.0.1, healthy before yielding."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, ckpt, log: Path, *args: str, api_key: str | None = None) -> Iterator[dict]:
    """{"base", "log", "proc"} of a server for `model` steered by `ckpt`; extra CLI `args` passed through."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "flas_vllm.cli", "serve", str(model), "--flas-checkpoint", str(ckpt),
           "--host", "127.0.0.1", "--port", str(port), *(["--api-key", api_key] if api_key else []), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"server did not become healthy:\n{log.read_text()[-4000:]}")
    try:
        yield {"base": base, "log": log, "proc": proc}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
