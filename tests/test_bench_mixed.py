"""The benchmark's mixed-traffic runs without an engine: which requests are steered, the config, the tables,
and the --graph-path variant (its flag, its file names, its README table)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flas_vllm.bench import command
from flas_vllm.bench.config import BenchConfig
from flas_vllm.bench.report import README_END, readme_table, readme_table_from
from flas_vllm.cli import app
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


def _report() -> dict:
    """A frozen full report (the 2026-11-21 run, before mixed-traffic runs existed), not the live results file."""
    return json.loads((ROOT / "tests/data/bench_report_2026-11-21.json").read_text())


def _add_mixed(report: dict, runs=((10, 26, 900.0, 0.9, 0.98), (50, 128, 800.0, 0.8, 0.95))) -> dict:
    """Synthetic mixed runs (percent steered, steered requests, tok/s, x vanilla, unsteered speed x vanilla)."""
    vanilla = next(r for r in report["runs"] if r["kind"] == "vanilla")
    report["runs"] += [dict(vanilla, kind="flas-mixed", name=f"flas-vllm mixed {p}% steered", steered_requests=s,
                            num_requests=256, output_tok_s=tok, ratio_output_to_vanilla=ratio,
                            ratio_unsteered_speed_to_vanilla=speed) for p, s, tok, ratio, speed in runs]
    return report


def test_readme_table_shows_mixed_rows_only_when_the_report_has_them():
    report = _report()
    before = readme_table(report)
    assert "mixed" not in before
    table = readme_table(_add_mixed(report))
    assert "| flas-vllm mixed, 10% / 50% steered | 900 / 800 | 0.90 / 0.80 |" in table
    assert "| unsteered requests in them (decode speed, TPOT p50) | | 0.98 / 0.95 |" in table
    assert "all-unsteered" not in table  # reports without the second ratio: no row for it
    assert all(line in table for line in before.splitlines())  # the rest of the table is unchanged
    for r, own in zip([r for r in report["runs"] if r["kind"] == "flas-mixed"], (1.01, 0.97)):
        r["ratio_unsteered_speed_to_unsteered_run"] = own
    assert ("| the same, x the all-unsteered flas-vllm run (same KV capacity) | | 1.01 / 0.97 |"
            in readme_table(report))


def _bench_config(monkeypatch, *flags) -> BenchConfig:
    """The config `flas-vllm bench` hands to run_benchmark (which is not run: no engine starts)."""
    seen = []
    monkeypatch.setattr(command, "run_benchmark", lambda cfg, log: seen.append(cfg))
    result = CliRunner().invoke(app, ["bench", "--model", "fixture", "--ks", "1", "--num-prompts", "4", "--no-hf",
                                      *flags])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_graph_path_flag_reaches_the_config_and_the_file_names(monkeypatch, tmp_path):
    default = _bench_config(monkeypatch, "--out", str(tmp_path))
    graph = _bench_config(monkeypatch, "--out", str(tmp_path), "--graph-path")
    assert (default.graph_path, graph.graph_path) == (False, True)
    assert default == dataclasses.replace(graph, graph_path=False)  # nothing else changes
    assert (default.stem, graph.stem) == ("bench_fixture", "bench_fixture-graph-path")  # side by side, same dir
    assert dataclasses.asdict(graph)["graph_path"] is True  # the JSON's config is asdict(cfg)


def test_flow_graphs_flag_reaches_the_config_and_the_file_names(monkeypatch, tmp_path):
    bucketed = _bench_config(monkeypatch, "--out", str(tmp_path), "--graph-path", "--flow-graphs", "bucketed")
    assert bucketed.flow_graphs == "bucketed" and bucketed.stem == "bench_fixture-graph-path-bucketed"
    assert _bench_config(monkeypatch, "--out", str(tmp_path), "--flow-graphs", "bucketed").stem == \
        "bench_fixture-bucketed"  # a GPU run with bucketed FULL graphs: beside the default, never over it
    result = CliRunner().invoke(app, ["bench", "--model", "fixture", "--ks", "1", "--num-prompts", "4", "--no-hf",
                                      "--flow-graphs", "buckets"])
    assert result.exit_code != 0 and "flow_graphs must be one of traced, bucketed, got 'buckets'" in result.output


def test_readme_table_adds_the_graph_path_run_found_next_to_the_default_one(tmp_path):
    report = _report()
    src = tmp_path / "bench_bench-2b-shape.json"
    src.write_text(json.dumps(report))
    alone = readme_table(report)
    assert readme_table_from(src) == alone  # no graph-path JSON: the table of old

    graph = _add_mixed(_report(), runs=((10, 26, 250.0, 0.89, 0.91), (50, 128, 240.0, 0.86, 0.88)))
    graph["config"]["graph_path"] = True
    (tmp_path / "bench_bench-2b-shape-graph-path.json").write_text(json.dumps(graph))
    table = readme_table_from(src)
    first, second = table.split("**Forced graph path** (`flas-vllm bench --graph-path`)")
    assert first == alone[:-len(README_END)]  # the default table is untouched, the graph path's follows it
    rows = [line for line in second.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| vanilla vLLM | 280.1 | 1.000 |", "| flas-vllm unsteered | 301.9 | 1.078 |",
                        "| flas-vllm, K = 1 / 8 / 64 / 256 / 1024 | 266 / 284 / 226 / 236 / 225 "
                        "| 0.95 / 1.01 / 0.81 / 0.84 / 0.80 |",
                        "| flas-vllm mixed, 10% / 50% steered | 250 / 240 | 0.89 / 0.86 |",
                        "| unsteered requests in them (decode speed, TPOT p50) | | 0.91 / 0.88 |"]
    assert table.endswith(README_END)

    bucketed = _add_mixed(_report(), runs=((10, 26, 270.0, 0.96, 0.97), (50, 128, 250.0, 0.89, 0.9)))
    bucketed["config"].update(graph_path=True, flow_graphs="bucketed")
    (tmp_path / "bench_bench-2b-shape-graph-path-bucketed.json").write_text(json.dumps(bucketed))
    three = readme_table_from(src)
    assert three.startswith(table[:-len(README_END)])  # the two tables of before, then the bucketed run's
    third = three.split("**Forced bucketed graph path** (`flas-vllm bench --graph-path --flow-graphs bucketed`)")[1]
    assert "| flas-vllm mixed, 10% / 50% steered | 270 / 250 | 0.96 / 0.89 |" in third

    with pytest.raises(ValueError, match="pass the default run's JSON"):
        readme_table(graph)
    with pytest.raises(ValueError, match="pass the default run's JSON"):
        readme_table(bucketed)
    with pytest.raises(ValueError, match="not 'bench-2b-shape'"):
        readme_table(report, dict(graph, config=dict(graph["config"], model="fixture")))


@pytest.mark.parametrize("page", [1_704_329, 4096 + 7, 123_457])
@pytest.mark.parametrize("block_tokens", [64, 128])  # tokens a block adds to the group-aware size
@pytest.mark.parametrize("budget_mib", [16, 512])
def test_vanilla_kv_bytes_land_within_a_block_of_the_flas_capacity(page, block_tokens, budget_mib):
    from flas_vllm.bench.runners import vanilla_kv_bytes_for_tokens

    cfg = BenchConfig(kv_cache_memory_bytes=budget_mib << 20)
    capacity = lambda nbytes: nbytes // page * block_tokens  # what vLLM makes of a budget: whole blocks
    vanilla = capacity(cfg.kv_cache_memory_bytes)
    for tokens in sorted({1, vanilla // 2, vanilla * 81 // 100 + 17, vanilla * 515 // 1000, vanilla - 1}):
        got = capacity(vanilla_kv_bytes_for_tokens(cfg, vanilla, tokens))
        assert tokens - block_tokens < got <= tokens + block_tokens, (tokens, got)


def test_engine_process_sets_vllm_s_variable_and_restores_it(monkeypatch):
    from vllm import envs

    from flas_vllm.bench.runners import MULTIPROCESSING_ENV, engine_process

    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")
    with engine_process(BenchConfig(engine_process="auto")) as mode:  # auto on CPU: inline
        assert mode == "inline" and not envs.VLLM_ENABLE_V1_MULTIPROCESSING
        envs.enable_envs_cache()  # as an inline engine core does when it starts
    assert envs.VLLM_ENABLE_V1_MULTIPROCESSING  # the variable is back, and read afresh
    monkeypatch.delenv(MULTIPROCESSING_ENV)
    with engine_process(BenchConfig(engine_process="separate")) as mode:
        assert mode == "separate" and envs.VLLM_ENABLE_V1_MULTIPROCESSING
    assert MULTIPROCESSING_ENV not in __import__("os").environ


def test_engine_process_and_equal_kv_flags_reach_the_config(monkeypatch, tmp_path):
    default = _bench_config(monkeypatch, "--out", str(tmp_path))
    assert (default.engine_process, default.equal_kv_vanilla) == ("auto", True)
    other = _bench_config(monkeypatch, "--out", str(tmp_path), "--engine-process", "separate", "--no-equal-kv")
    assert (other.engine_process, other.equal_kv_vanilla) == ("separate", False)
    assert default == dataclasses.replace(other, engine_process="auto", equal_kv_vanilla=True)
    result = CliRunner().invoke(app, ["bench", "--model", "fixture", "--ks", "1", "--no-hf", "--engine-process", "x"])
    assert result.exit_code != 0 and "engine_process must be one of auto, inline, separate, got 'x'" in result.output


def test_readme_table_shows_vanilla_at_the_flas_blocks_when_the_report_has_it():
    report = _report()
    runs = report["runs"]
    runs.insert(1, {**runs[0], "name": "vanilla vLLM at flas-vllm's KV capacity", "kind": "vanilla-equal-kv",
                    "output_tok_s": 880.0, "ratio_output_to_vanilla": 0.88})
    report["kv_capacity"]["unsteered_x_vanilla_at_flas_kv"] = 0.9765
    table = readme_table(report)
    lines = table.splitlines()
    at = lines.index("| vanilla vLLM at flas-vllm's KV capacity | 880.0 | 0.880 |")
    assert lines[at - 1].startswith("| vanilla vLLM |") and lines[at + 1].startswith("| flas-vllm unsteered |")
    assert "flas-vllm unsteered x vanilla at the same KV capacity 0.977" in table
    assert "at flas-vllm's KV capacity | |" not in table  # no mixed runs with the ratio: no row
    for r, equal in zip(_add_mixed(report)["runs"][-2:], (0.93, 0.88)):
        r["ratio_unsteered_speed_to_vanilla_at_flas_kv"] = equal
    assert "| the same, x vanilla vLLM at flas-vllm's KV capacity | | 0.93 / 0.88 |" in readme_table(report)
