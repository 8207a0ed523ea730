"""benchmarks/gpu_ceiling.py (the GPU ceiling measurement) runs end to end in --quick mode, on torch alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ceiling.py"


def test_quick_mode_measures_every_component_without_vllm(tmp_path):
    out = tmp_path / "rows.json"
    code = (
        "import runpy, sys; "
        f"sys.argv = ['gpu_ceiling.py', '--quick', '--device', 'cpu', '--json', {str(out)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
        "print('vllm imported' if 'vllm' in sys.modules else 'torch only')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("torch only")
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["tokens"] for r in rows] == [1, 8, 64]
    for r in rows:
        for key in ("flow_ms", "cross_attention_ms", "layer_ms", "flow_over_base"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0 < r["ceiling"] < 1
        assert math.isclose(r["ceiling"], 1 / (1 + r["flow_over_base"]), rel_tol=1e-9)
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("tiny")]
    assert [int(cols[1]) for cols in table] == [1, 8, 64]


def test_bad_arguments_name_the_option():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tokens", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--tokens" in proc.stderr
