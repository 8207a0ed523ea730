"""Smoke test of the benchmark: every section present, every number finite and positive (no timing thresholds)."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.engine

SECTIONS = ("config", "environment", "model", "workload", "engines", "runs", "ratios", "flops",
            "kv_capacity", "concept_encoding", "not_measured", "notes", "files")


def _positive(x, what):
    assert isinstance(x, (int, float)) and not isinstance(x, bool), f"{what}: {x!r} is not a number"
    assert math.isfinite(x) and x > 0, f"{what}: {x!r} is not finite and positive"


def test_bench_smoke_on_fixture(tmp_path, tiny_model):
    from flas_vllm.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(model="fixture", ks=[1, 2], num_prompts=4, output_len=4, out_dir=tmp_path,
                      kv_cache_memory_bytes=256 * 1024 * 1024, encode_probe_concepts=2, rounds=2)
    before_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    report = run_benchmark(cfg, log=lambda s: None)

    on_disk = json.loads((tmp_path / "bench_fixture.json").read_text())
    assert (tmp_path / "bench_fixture.md").read_text().startswith("# flas-vllm benchmark")
    for section in SECTIONS:
        assert section in on_disk, section
    assert on_disk["runs"] == report["runs"]

    # two rounds of the vLLM engines (the transformers path runs once): each ratio the median of the rounds'
    rounds = on_disk["rounds"]
    assert len(rounds) == 2 and all(list(r["runs"]) == [x["name"] for x in on_disk["runs"][:7]] for r in rounds)
    for r in on_disk["runs"][:7]:
        each = [x["runs"][r["name"]]["ratio_output_to_vanilla"] for x in rounds]
        assert abs(r["ratio_output_to_vanilla"] - (each[0] + each[1]) / 2) < 1e-3, (r["name"], each)
    assert "## Rounds" in (tmp_path / "bench_fixture.md").read_text()

    kinds = [r["kind"] for r in on_disk["runs"]]
    assert kinds == ["vanilla", "vanilla-equal-kv", "flas-unsteered", "flas-steered", "flas-steered", "flas-mixed",
                     "flas-mixed", "hf", "hf"]
    # vanilla again at the FLAS engine's KV capacity (less: the flow's paged layers share the same memory),
    # within one block of it
    engines, kv = on_disk["engines"], on_disk["kv_capacity"]
    tokens = {name: engines[name]["kv"]["group_aware_tokens"] for name in ("vanilla", "flas", "vanilla_at_flas_kv")}
    assert tokens["flas"] < tokens["vanilla"]
    assert abs(tokens["vanilla_at_flas_kv"] - tokens["flas"]) <= engines["vanilla"]["kv"]["block_size"], tokens
    assert engines["vanilla_at_flas_kv"]["kv_cache_memory_bytes"] < cfg.kv_cache_memory_bytes
    assert kv["vanilla_at_flas_kv"]["group_aware_tokens"] == tokens["vanilla_at_flas_kv"]
    names = {r["kind"]: r["name"] for r in on_disk["runs"]}
    per_round = [x["runs"][names["flas-unsteered"]]["output_tok_s"] / x["runs"][names["vanilla-equal-kv"]]["output_tok_s"]
                 for x in rounds]
    assert abs(kv["unsteered_x_vanilla_at_flas_kv"] - sum(per_round) / 2) < 1e-3  # the median of two rounds
    for r in on_disk["runs"]:
        if r["kind"] == "flas-mixed":  # like for like: vanilla's decode speed at the same concurrency, each round
            each = [x["runs"][r["name"]]["ratio_unsteered_speed_to_vanilla_at_flas_kv"] for x in rounds]
            assert abs(r["ratio_unsteered_speed_to_vanilla_at_flas_kv"] - sum(each) / 2) < 1e-3
    assert on_disk["environment"]["engine_process"] == "inline"  # auto, on CPU
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == before_env  # restored
    for r in on_disk["runs"]:
        what = r["name"]
        assert r["num_requests"] == 4 and r["output_tokens"] == 4 * 4, what
        for key in ("wall_s", "output_tok_s", "total_tok_s", "ratio_output_to_vanilla", "ratio_total_to_vanilla"):
            _positive(r[key], f"{what} {key}")
        for key in ("ttft_ms", "tpot_ms"):
            assert r[key] is not None, f"{what} {key} not measured"
            for p in ("p50", "p90", "p99"):
                _positive(r[key][p], f"{what} {key} {p}")
    assert [r["concepts_used"] for r in on_disk["runs"] if r["kind"] == "flas-steered"] == [1, 2]
    for r in on_disk["runs"]:
        if r["kind"] == "flas-steered":
            _positive(r["encode_s"], f"{r['name']} encode_s")

    mixed = [r for r in on_disk["runs"] if r["kind"] == "flas-mixed"]
    assert [r["steered_requests"] for r in mixed] == [1, 2]  # 10% and 50% of 4 requests (at least one)
    assert [r["name"] for r in mixed] == ["flas-vllm mixed 10% steered", "flas-vllm mixed 50% steered"]
    for r in mixed:
        _positive(r["ratio_unsteered_speed_to_vanilla"], f"{r['name']} unsteered speed")
        for p in ("p50", "p90", "p99"):
            _positive(r["unsteered_tpot_ms"][p], f"{r['name']} unsteered TPOT {p}")
    md = (tmp_path / "bench_fixture.md").read_text()
    assert "## Mixed traffic" in md and "| flas-vllm mixed 50% steered | 2 of 4 |" in md

    for name, ratio in on_disk["ratios"].items():
        _positive(ratio["output_tok_s"], name)
        _positive(ratio["total_tok_s"], name)

    for key in ("at_mean_context", "weights_only", "reference_gemma_2_2b_dims"):
        c = on_disk["flops"][key]
        for field in ("base_flops_per_token", "flow_flops_per_token", "throughput_ceiling"):
            _positive(c[field], f"flops {key} {field}")
        assert c["throughput_ceiling"] < 1

    kv = on_disk["kv_capacity"]
    for engine in ("vanilla", "flas"):
        _positive(kv[engine]["blocks_x_block_size_tokens"], f"kv {engine}")
    for key, ratio in kv["ratio_flas_to_vanilla"].items():
        _positive(ratio, f"kv ratio {key}")

    enc = on_disk["concept_encoding"]
    for key in ("engine_mean_encode_ms", "preload_one_concept_mean_ms", "hf_encode_one_concept_mean_ms"):
        _positive(enc[key], key)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in x for x in on_disk["not_measured"])
    else:
        assert (tmp_path / "bench_fixture.png").stat().st_size > 0
