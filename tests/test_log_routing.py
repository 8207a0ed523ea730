"""FLAS's log records are shown where vLLM's are (engine/log_routing.py), each case in a fresh process:
logging is process-wide state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, sys
    from flas_vllm.engine.plugin import register
    if "app" in sys.argv:  # the application configured the flas_vllm logger itself
        app = logging.StreamHandler(sys.stderr)
        app.setFormatter(logging.Formatter("APP %(message)s"))
        logging.getLogger("flas_vllm").addHandler(app)
    if "root" in sys.argv:  # the application configured logging for every library, at WARNING
        logging.basicConfig(stream=sys.stderr, format="ROOT %(message)s")
    if "root-info" in sys.argv:  # ... at INFO
        logging.basicConfig(stream=sys.stderr, format="ROOT %(message)s", level=logging.INFO)
    level = "DEBUG" if "vllm-debug" in sys.argv else None  # the level a server's --log-level gives vLLM
    register()
    log = logging.getLogger("flas_vllm.engine.model")
    log.info("flas info before vllm")
    log.warning("flas warning before vllm")
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging
    configure_logging(LoggingConfig(**({"log_level": level} if level else {})))  # what an engine does at start
    log.info("flas info after vllm")
    log.debug("flas debug after vllm")
    logging.getLogger("vllm.x").info("vllm info")
""")


def _run(*args: str, **env: str) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) that mention a message of SCRIPT."""
    environ = {**os.environ, "VLLM_LOGGING_COLOR": "0", **env}
    for name in [n for n in environ if n.startswith("VLLM_LOGGING") or n == "VLLM_CONFIGURE_LOGGING"]:
        if name not in env:
            environ.pop(name)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=environ,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pick = lambda text: [line for line in text.splitlines() if "flas " in line or "vllm info" in line]
    return pick(proc.stdout), pick(proc.stderr)


@pytest.fixture(scope="module")
def default_run():
    return _run()


def test_flas_info_is_shown_as_vllm_shows_its_own_once_vllm_configures_logging(default_run):
    out, err = default_run
    flas = next(line for line in out if "flas info after vllm" in line)
    vllm = next(line for line in out if "vllm info" in line)
    assert " INFO " in flas and " INFO " in vllm  # vLLM's format, on vLLM's stream (stdout)
    assert not any("after vllm" in line for line in err)  # once: not also by Python's last resort
    assert not any("debug" in line for line in out + err)  # vLLM's level (INFO)


def test_before_vllm_configures_logging_flas_records_go_where_python_sends_them(default_run):
    out, err = default_run
    assert any("flas warning before vllm" in line for line in err)  # the last-resort handler
    assert not any("flas info before vllm" in line for line in out + err)  # below its level


def test_vllm_logging_level_applies_to_flas_records():
    out, _ = _run(VLLM_LOGGING_LEVEL="DEBUG")
    assert any("flas debug after vllm" in line for line in out)
    out, err = _run(VLLM_LOGGING_LEVEL="WARNING")
    assert not any("info" in line for line in out + err)


def test_the_level_vllm_is_configured_with_applies_when_a_record_is_emitted():
    """A server's --log-level reaches vLLM through its LoggingConfig, after the plugin loaded."""
    out, _ = _run("vllm-debug")
    assert any("flas debug after vllm" in line for line in out)


def test_logging_left_to_the_application():
    """VLLM_CONFIGURE_LOGGING=0: Python's defaults (WARNING and up). A flas_vllm logger the application
    configured keeps its own handler, and is not routed."""
    out, err = _run(VLLM_CONFIGURE_LOGGING="0")
    assert not any("info" in line for line in out + err)
    assert any("flas warning before vllm" in line for line in err)
    out, err = _run("app")
    assert any(line.startswith("APP flas warning before vllm") for line in err)
    assert not any("flas info after vllm" in line for line in out)


def test_an_application_logging_setup_shows_flas_records_once_at_its_level():
    """Root handlers (logging.basicConfig, pytest's capture): FLAS's records reach them at the root's level,
    and are not also shown by vLLM's handler."""
    out, err = _run("root")
    assert "ROOT flas warning before vllm" in err and not any("info" in line for line in err)  # WARNING
    assert not any("flas" in line for line in out)
    assert any("vllm info" in line for line in out)  # vLLM's own records keep vLLM's handler
    out, err = _run("root-info")
    assert "ROOT flas info after vllm" in err and "ROOT flas info before vllm" in err
    assert not any("flas" in line for line in out)
