"""The benchmark's mixed-traffic runs without an engine: which requests are steered, the config, the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flas_vllm.bench.config import BenchConfig
from flas_vllm.bench.report import readme_table
from flas_vllm.bench.workload import steered_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, fraction, steered", [(256, 0.1, 26), (256, 0.5, 128), (4, 0.1, 1), (4, 0.5, 2),
                                                  (2, 0.9, 1), (10, 0.99, 9)])
def test_steered_mask_takes_the_fraction_spread_over_the_batch(n, fraction, steered):
    mask = steered_mask(n, fraction)
    assert len(mask) == n and sum(mask) == steered
    idx = [i for i, s in enumerate(mask) if s]
    gaps = {b - a for a, b in zip(idx, idx[1:])}
    assert max(gaps, default=0) - min(gaps, default=0) <= 1  # evenly spread, not bunched at the front


def test_config_rejects_fractions_outside_zero_one():
    assert BenchConfig(mixed_fractions=[0.5, 0.1, 0.5]).resolved().mixed_fractions == [0.1, 0.5]
    for bad in ([0.0], [1.0], [1.5]):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            BenchConfig(mixed_fractions=bad).resolved()
    with pytest.raises(ValueError, match="num_prompts >= 2"):
        BenchConfig(ks=[1], num_prompts=1).resolved()
    assert BenchConfig(ks=[1], num_prompts=1, mixed_fractions=[]).resolved().num_prompts == 1


def test_readme_table_shows_mixed_rows_only_when_the_report_has_them():
    report = json.loads((ROOT / "benchmarks/results/bench_bench-2b-shape.json").read_text())
    before = readme_table(report)
    assert "mixed" not in before
    vanilla = next(r for r in report["runs"] if r["kind"] == "vanilla")
    report["runs"] += [dict(vanilla, kind="flas-mixed", name=f"flas-vllm mixed {p}% steered", steered_requests=s,
                            num_requests=256, output_tok_s=tok, ratio_output_to_vanilla=ratio,
                            ratio_unsteered_speed_to_vanilla=speed)
                       for p, s, tok, ratio, speed in ((10, 26, 900.0, 0.9, 0.98), (50, 128, 800.0, 0.8, 0.95))]
    table = readme_table(report)
    assert "| flas-vllm mixed, 10% / 50% steered | 900 / 800 | 0.90 / 0.80 |" in table
    assert "| unsteered requests in them (decode speed, TPOT p50) | | 0.98 / 0.95 |" in table
    assert all(line in table for line in before.splitlines())  # the rest of the table is unchanged
