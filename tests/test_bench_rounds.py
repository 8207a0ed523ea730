"""`flas-vllm bench --rounds N` (bench/rounds.py): each round's ratios side by side, the report's the medians.
No engines here: the aggregation on made-up runs (the bench smoke test runs two real rounds)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flas_vllm.bench import BenchConfig
from flas_vllm.bench.report import render_markdown, summary_lines
from flas_vllm.bench.results import RunResult
from flas_vllm.bench.rounds import median_runs, round_record, set_ratios
from flas_vllm.cli import app


def _ms(p50):
    return None if p50 is None else {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2}


def _run(name, kind, wall_s, tpot_p50=None, unsteered_p50=None) -> RunResult:
    return RunResult(name=name, kind=kind, k=None, concepts_used=0, num_requests=4, prompt_tokens=40,
                     output_tokens=100, wall_s=wall_s, tpot_ms=_ms(tpot_p50), unsteered_tpot_ms=_ms(unsteered_p50))


def _round(vanilla_s, equal_s, unsteered_s, mixed_s, mixed_unsteered_tpot):
    runs = [_run("vanilla vLLM", "vanilla", vanilla_s, 10.0), _run("vanilla at KV", "vanilla-equal-kv", equal_s, 11.0),
            _run("flas unsteered", "flas-unsteered", unsteered_s, 12.0),
            _run("flas mixed", "flas-mixed", mixed_s, 13.0, mixed_unsteered_tpot)]
    set_ratios(runs, runs[0], runs[2], runs[1])
    return runs


def test_ratios_are_each_rounds_own_side_by_side():
    vanilla, equal, unsteered, mixed = _round(1.0, 1.25, 1.5, 2.0, 16.0)
    assert vanilla.ratio_output_to_vanilla == 1.0 and unsteered.ratio_output_to_vanilla == round(1 / 1.5, 4)
    assert mixed.ratio_output_to_vanilla == 0.5
    assert mixed.ratio_unsteered_speed_to_vanilla == round(10 / 16, 4)
    assert mixed.ratio_unsteered_speed_to_unsteered_run == 0.75
    assert mixed.ratio_unsteered_speed_to_vanilla_at_flas_kv == round(11 / 16, 4)
    assert unsteered.ratio_unsteered_speed_to_vanilla is None  # no unsteered requests of its own to time


def test_the_report_keeps_the_median_of_the_rounds_ratios():
    rounds = [_round(1.0, 1.1, 1.2, 2.0, 16.0),  # a fast vanilla: the FLAS runs look slow next to it
              _round(1.5, 1.6, 1.55, 1.8, 12.0),
              _round(1.6, 1.3, 1.4, 1.9, 10.0)]  # the median-throughput round is not the median-ratio one
    vanilla, equal, unsteered, mixed = median_runs(rounds)
    assert mixed.ratio_output_to_vanilla == round(sorted(r[3].ratio_output_to_vanilla for r in rounds)[1], 4)
    assert mixed.ratio_unsteered_speed_to_vanilla_at_flas_kv == round(
        sorted(r[3].ratio_unsteered_speed_to_vanilla_at_flas_kv for r in rounds)[1], 4)
    assert unsteered.ratio_output_to_vanilla == round(sorted(r[2].ratio_output_to_vanilla for r in rounds)[1], 4)
    # tokens/s and latencies: the round at the median throughput, for that run
    assert mixed.ratio_output_to_vanilla == round(1.5 / 1.8, 4)  # round 2's, while mixed's figures are round 3's
    assert mixed.ratio_unsteered_speed_to_vanilla_at_flas_kv == round(11 / 12, 4)
    assert unsteered.ratio_output_to_vanilla == round(1.5 / 1.55, 4)
    assert mixed.wall_s == 1.9 and vanilla.wall_s == 1.5 and equal.wall_s == 1.3
    assert rounds[2][3] is not mixed  # a copy: the rounds' own records keep their ratios
    assert rounds[2][3].ratio_output_to_vanilla == round(1.6 / 1.9, 4)
    one = median_runs([rounds[0]])
    assert [r.ratio_output_to_vanilla for r in one] == [r.ratio_output_to_vanilla for r in rounds[0]]


def test_rounds_with_different_runs_are_refused():
    with pytest.raises(ValueError):
        median_runs([_round(1.0, 1.1, 1.2, 2.0, 16.0), _round(1.0, 1.1, 1.2, 2.0, 16.0)[:3]])


def test_every_round_is_in_the_summary_and_the_markdown():
    rounds = [_round(1.0, 1.1, 1.2, 2.0, 16.0), _round(1.5, 1.6, 1.55, 1.8, 12.0)]
    records = [round_record(r, f"t{i}") for i, r in enumerate(rounds)]
    assert records[1]["runs"]["flas mixed"]["ratio_output_to_vanilla"] == round(1.5 / 1.8, 4)
    report = {"config": {"model": "fixture", "num_prompts": 4, "output_len": 25, "dtype": "float32",
                         "enforce_eager": True},
              "environment": {}, "workload": {"mean_prompt_tokens": 10.0},
              "runs": [r.as_dict() for r in median_runs(rounds)], "rounds": records,
              "flops": {k: {"context_tokens": 1, "base_flops_per_token": 1.0, "flow_flops_per_token": 0.1,
                            "flow_over_base": 0.1, "throughput_ceiling": 0.9}
                        for k in ("at_mean_context", "weights_only", "reference_gemma_2_2b_dims")}
              | {"flas": {"layer": 1, "num_blocks": 1, "n_steps": 3, "concept_max_len": 8}, "note": "n"},
              "kv_capacity": {}, "concept_encoding": {}}
    lines = summary_lines(report)
    assert "  medians of 2 rounds; x vanilla in each round:" in lines
    assert any(line.split() == ["flas", "mixed", f"{1 / 2.0:.3f}", "/", f"{1.5 / 1.8:.3f}"] for line in lines)
    md = render_markdown(report)
    assert "## Rounds" in md and f"| flas mixed | {1 / 2.0:.3f} | {1.5 / 1.8:.3f} |" in md


def test_rounds_must_be_at_least_one():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        BenchConfig(rounds=0).resolved()
    result = CliRunner().invoke(app, ["bench", "--model", "fixture", "--ks", "1", "--no-hf", "--rounds", "0"])
    assert result.exit_code != 0 and "--rounds" in result.output
