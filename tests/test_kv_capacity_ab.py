"""benchmarks/kv_capacity_ab.py (flas-vllm unsteered against vanilla at the same KV capacity, interleaved) runs
end to end on the fixture model: both engines, in turns, with the capacities the report says."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_capacity_ab.py"


def test_interleaved_runs_at_the_same_kv_capacity(tmp_path, tiny_model):
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "fixture", "--num-prompts", "4", "--output-len",
                           "4", "--kv-cache-mib", "64", "--rounds", "1", "--runs", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["flas_tokens"] < report["vanilla_tokens_at_budget"]  # the flow's paged layers take their share
    assert report["vanilla_kv_bytes"] < report["kv_cache_memory_bytes"]
    (pair,) = report["rounds"]
    assert pair["flas"]["kv_tokens"] == report["flas_tokens"]
    block = 128  # vLLM's CPU block size: vanilla lands within one block of the FLAS engine's capacity
    assert abs(pair["vanilla"]["kv_tokens"] - report["flas_tokens"]) <= block
    for role in ("flas", "vanilla"):
        assert len(pair[role]["walls"]) == 2 and all(w > 0 for w in pair[role]["walls"])
    ratio = report["flas_unsteered_x_vanilla_same_kv"]
    assert math.isfinite(ratio) and ratio > 0
    assert "x vanilla at the same KV capacity" in proc.stdout


@pytest.mark.parametrize("flag", ["--rounds", "--child-timeout"])
def test_counts_must_be_positive(flag):
    proc = subprocess.run([sys.executable, str(SCRIPT), flag, "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"{flag} must be >= 1" in proc.stderr


def test_an_engine_that_does_not_finish_in_time_fails_the_run_by_name(tiny_model):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "fixture", "--num-prompts", "4", "--child-timeout",
                           "1"], capture_output=True, text=True, timeout=120)  # no engine starts within 1 s
    assert proc.returncode != 0
    assert "vanilla engine did not finish within --child-timeout=1 s" in proc.stderr
