"""benchmarks/gpu_ceiling.py (the GPU ceiling measurement) runs end to end in --quick mode, on torch alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ceiling.py"


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    argv = ["gpu_ceiling.py", "--quick", "--device", "cpu", "--json", str(out), *args]
    code = (
        "import runpy, sys; "
        f"sys.argv = {argv!r}; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
        "print('vllm imported' if 'vllm' in sys.modules else 'torch only')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("torch only")
    return proc, json.loads(out.read_text())


def test_quick_mode_measures_every_component_without_vllm(tmp_path):
    proc, report = _run(tmp_path)
    assert report["mode"] == "eager" and report["device_name"] == "cpu"
    rows = report["rows"]
    assert [r["tokens"] for r in rows] == [1, 8, 64]
    for r in rows:
        for key in ("flow_ms", "cross_attention_ms", "cross_gather_ms", "layer_ms", "flow_over_base",
                    "gemm_ms", "concept_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["other_ms"] >= 0
        assert "cross_flex_ms" not in r  # a CPU table has only the gather
        assert isinstance(r["kernels_per_flow"], int) and r["kernels_per_flow"] > 0
        assert 0 < r["ceiling"] < 1
        assert math.isclose(r["ceiling"], 1 / (1 + r["flow_over_base"]), rel_tol=1e-9)
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("tiny")]
    assert [int(cols[1]) for cols in table] == [1, 8, 64]


def test_compiled_mode_launches_fewer_kernels_than_eager(tmp_path):
    """Inductor fuses the flow's pointwise work: the profiler's count per flow call drops (a count, not a time)."""
    _, eager = _run(tmp_path, "--tokens", "8")
    _, compiled = _run(tmp_path, "--tokens", "8", "--mode", "compiled")
    assert compiled["mode"] == "compiled"
    e, c = eager["rows"][0], compiled["rows"][0]
    assert 0 < c["kernels_per_flow"] < e["kernels_per_flow"] / 2, (c["kernels_per_flow"], e["kernels_per_flow"])
    assert c["concept_ms"] > 0  # found as the opaque op in the compiled graph


def test_flex_concept_attention_is_timed_and_checked_against_the_gather(tmp_path):
    """On a GPU the engine's table runs FlexAttention; --concept flex runs it on CPU (compiled per shape)."""
    proc, report = _run(tmp_path, "--tokens", "8", "--concept", "flex")
    row = report["rows"][0]
    assert row["cross_flex_ms"] > 0 and row["cross_gather_ms"] > 0
    assert row["cross_attention_ms"] == row["cross_flex_ms"]
    assert row["cross_flex_max_abs_diff"] < 2e-2  # bf16: the bound test_concept_attention.py states
    assert "flex - gather max abs" in proc.stdout


def test_bad_arguments_name_the_option():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tokens", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--tokens" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--mode", "graphs"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--mode graphs needs a CUDA device" in proc.stderr
