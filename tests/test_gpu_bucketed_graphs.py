"""benchmarks/gpu_bucketed_graphs.py (a bucketed FULL graph's flow, captured and replayed on a GPU) runs end
to end in --quick mode on torch alone, and its check catches a graph that replays stale steering. On CPU
nothing is captured (a replay is an eager call): the capture itself is for a GPU run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bucketed_graphs.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bucketed_graphs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_checks_every_bucket_without_vllm(tmp_path):
    from flas_vllm.engine.graph_buckets import flow_row_buckets

    out = tmp_path / "rows.json"
    argv = ["gpu_bucketed_graphs.py", "--quick", "--device", "cpu", "--json", str(out)]
    code = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
            "print('vllm imported' if 'vllm' in sys.modules else 'torch only')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("torch only")
    report = json.loads(out.read_text())
    assert report["device_name"] == "cpu" and report["mode"] == "eager"
    rows = report["rows"]
    for n in (16, 32):
        assert [r["bucket"] for r in rows if r["tokens"] == n] == [b for b in flow_row_buckets(n, 4) if b > 0]
    for r in rows:
        assert r["passed"] and len(r["checks"]) == 3
        assert all(0 < c["steered_tokens"] <= r["bucket"] and c["flow_moved_max_abs"] > 0 and c["equal"]
                   for c in r["checks"])  # on CPU a "replay" is the same eager call: bit-equal
        assert r["replay_ms"] > 0 and r["traced_every_token_ms"] > 0


def test_a_graph_that_replays_stale_steering_fails_the_check(monkeypatch, capsys):
    """A 'capture' that runs the capture step once and replays nothing (what a graph reading host data copied
    at capture would give): the first step staged after it differs, and the script exits 1."""
    module = _load()
    monkeypatch.setattr(module, "capture", lambda fn, mode, device: (fn(), lambda: None)[1])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--quick", "--device", "cpu", "--tokens", "16"])
    assert exit_.value.code == 1
    assert "FAILED: a capture failed, a replay differs" in capsys.readouterr().err


def test_a_capture_that_fails_is_recorded_and_the_other_buckets_still_run(monkeypatch, tmp_path):
    """A capture raising (a host sync inside it, say) is a row with its error; the run goes on, then exits 1."""
    module = _load()
    calls = []

    def capture(fn, mode, device):
        calls.append(mode)
        if len(calls) == 2:  # the first bucket's capture (the first call is the traced flow's)
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    monkeypatch.setattr(module, "capture", capture)
    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit):
        module.main(["--quick", "--device", "cpu", "--tokens", "16", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["capture_error"] == "RuntimeError: operation not permitted when stream is capturing"
    assert not rows[0]["passed"] and all(r["passed"] for r in rows[1:]) and len(rows) == 3


def test_the_prepared_gpu_session_runs_both_scripts_and_keeps_their_outputs(tmp_path):
    """benchmarks/gpu_session.sh, the one command a lent GPU machine runs, in its CPU smoke form."""
    script = SCRIPT.parent / "gpu_session.sh"
    env = {"PATH": "/usr/bin:/bin", "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script)], cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_bucketed_graphs exit 0, gpu_ceiling exit 0" in proc.stdout
    assert json.loads((tmp_path / "bucketed.json").read_text())["rows"]
    assert json.loads((tmp_path / "ceiling.json").read_text())["rows"]
    assert "torch " in (tmp_path / "machine.txt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "64,x"], "--tokens '64,x': expected comma-separated integers"),
    (["--tokens", "30", "--seq-len", "8"], "--tokens 30: must be >= 1 and a multiple of --seq-len 8 (or below it)"),
    (["--seq-len", "0"], "--seq-len 0 and --concepts 64: each must be >= 1"),
])
def test_bad_arguments_are_usage_errors_naming_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load().main(["--quick", "--device", "cpu", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
