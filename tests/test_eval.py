"""Bulk generation: AxBench prompt sampling, SIGKILL + resume, Ray sharding with a killed actor, end to end."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flas_vllm.offline import (
    GENERATION_SCHEMA, build_jobs, load_concepts, load_prompts, read_parts, request_seed, sample_prompt_ids,
)

DATA = Path(__file__).resolve().parents[1] / "flas_vllm" / "data"
ENGINE = ["--dtype", "float32", "--eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 * 1024 * 1024)]
MAX_TOKENS = 16
N_CONCEPTS, N_PROMPTS, FLOWTIMES = 4, 3, "0,1.5"


# -- inputs (no engine) -----------------------------------------------------------------------


def test_axbench_prompt_rule_and_loaders(tmp_path):
    prompts = load_prompts(DATA / "alpaca_eval.json")
    assert len(prompts) == 805
    ids = sample_prompt_ids(17, 5, len(prompts))
    assert [prompts[i] for i in ids] == random.Random(17).sample(prompts, 5)  # AxBench's rule, file order
    concepts = load_concepts(DATA / "concept500_2b_l20_metadata.jsonl")
    assert concepts[0].concept_id == 0 and len(concepts) == 500
    (tmp_path / "c.txt").write_text("pirates\n\nthe sea\n")
    assert [c.concept for c in load_concepts(tmp_path / "c.txt")] == ["pirates", "the sea"]
    (tmp_path / "c.csv").write_text("concept_id,concept\n7,pirates\n9,the sea\n")
    assert [c.concept_id for c in load_concepts(tmp_path / "c.csv")] == [7, 9]
    (tmp_path / "bad.csv").write_text("concept_id,concept\n7,pirates\n7,again\n")
    with pytest.raises(ValueError, match="not unique"):
        load_concepts(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="num_prompts"):
        sample_prompt_ids(1, 900, 805)


def test_jobs_cover_the_product_with_order_independent_seeds():
    prompts = load_prompts(DATA / "alpaca_eval.json")
    concepts = load_concepts(DATA / "concept500_2b_l20_metadata.jsonl")[:3]
    jobs = build_jobs(concepts, prompts, [0.0, 1.0], 4, seed=5)
    assert len(jobs) == 3 * 4 * 2 and len({j.key for j in jobs}) == len(jobs)
    j = jobs[5]
    assert j.seed == request_seed(5, j.concept_id, j.prompt_id, j.flowtime)


def test_parquet_concepts_from_axbench_training_file(tmp_path):
    import pyarrow as pa

    table = pa.table({"output_concept": ["a", "a", "b", "neg"], "concept_id": [3, 3, 5, -1]})
    pq.write_table(table, tmp_path / "train.parquet")
    assert [(c.concept_id, c.concept) for c in load_concepts(tmp_path / "train.parquet")] == [(3, "a"), (5, "b")]


# -- real engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "metadata.jsonl"
    rows = [json.loads(line) for line in (DATA / "concept500_2b_l20_metadata.jsonl").read_text().splitlines()]
    path.write_text("\n".join(json.dumps({"concept_id": r["concept_id"], "concept": r["concept"]})
                              for r in rows[:N_CONCEPTS]) + "\n")
    return path


def _generate_cmd(tiny_model, ckpt, concepts_file, out, *extra):
    return [sys.executable, "-m", "flas_vllm.cli", "generate", "--out", str(out), "--model", str(tiny_model),
            "--flas-checkpoint", str(ckpt), "--concepts", str(concepts_file), "--num-prompts", str(N_PROMPTS),
            "--flowtimes", FLOWTIMES, "--max-tokens", str(MAX_TOKENS), "--temperature", "1.0", "--seed", "3",
            *ENGINE, *extra]


def _rows(path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: (r["concept_id"], r["prompt_id"], r["flowtime"]))


@pytest.fixture(scope="module")
def reference_rows(tiny_model, make_ckpt, concepts_file, tmp_path_factory):
    """A clean single-process run: what every resumed or distributed run must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    ckpt = make_ckpt(num_blocks=1)
    subprocess.run(_generate_cmd(tiny_model, ckpt, concepts_file, out), check=True, timeout=900)
    rows = _rows(out / "generations.parquet")
    assert len(rows) == N_CONCEPTS * N_PROMPTS * 2
    return rows


@pytest.mark.engine
def test_sigkill_mid_run_then_resume_completes_without_duplicates(tiny_model, make_ckpt, concepts_file,
                                                                   reference_rows, tmp_path):
    ckpt = make_ckpt(num_blocks=1)
    # small waves (4 requests decoded at once) so that parts land while work remains
    cmd = _generate_cmd(tiny_model, ckpt, concepts_file, tmp_path, "--flush-rows", "2", "--max-num-seqs", "4")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list((tmp_path / "parts").glob("part-*.parquet")):
        assert proc.poll() is None, "generate exited before writing its first part"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_parts(tmp_path / "parts", GENERATION_SCHEMA).num_rows
    assert 0 < partial < len(reference_rows), "the kill should land mid-run"
    assert not (tmp_path / "generations.parquet").exists()

    subprocess.run(cmd, check=True, timeout=900)
    rows = _rows(tmp_path / "generations.parquet")
    keys = [(r["concept_id"], r["prompt_id"], r["flowtime"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(reference_rows)
    all_parts = read_parts(tmp_path / "parts", GENERATION_SCHEMA).to_pylist()
    assert len(all_parts) == len(reference_rows)  # the resume wrote only what was missing
    assert rows == reference_rows


@pytest.mark.engine
def test_ray_eval_with_a_killed_actor_matches_the_single_process_run(tiny_model, make_ckpt, concepts_file,
                                                                      reference_rows, tmp_path):
    import psutil
    import ray

    from flas_vllm.eval import GenerateSpec, run_generate_ray
    from flas_vllm.offline import GenerationSettings

    ckpt = make_ckpt(num_blocks=1)
    spec = GenerateSpec(
        model=str(tiny_model), checkpoint=str(ckpt), concepts=str(concepts_file),
        prompts=str(DATA / "alpaca_eval.json"), num_prompts=N_PROMPTS, flowtimes=[0.0, 1.5],
        settings=GenerationSettings(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, flush_rows=2),
        engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512,
                       "kv_cache_memory_bytes": 256 * 1024 * 1024},
    )
    ray.init(num_cpus=2, include_dashboard=False)
    killed = []

    def kill_one_actor_once_work_is_on_disk():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list((tmp_path / "shards").glob("shard-*/part-*.parquet")):
                for p in psutil.process_iter(["pid", "cmdline"]):
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "ray::GenerationActor" in cmd:
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_once_work_is_on_disk, daemon=True)
    killer.start()
    try:
        table = run_generate_ray(spec, tmp_path, num_actors=2, shards_per_actor=1)
    finally:
        ray.shutdown()
    killer.join(timeout=5)
    assert killed, "no actor was killed: the test did not exercise the retry"
    rows = sorted(table.to_pylist(), key=lambda r: (r["concept_id"], r["prompt_id"], r["flowtime"]))
    assert rows == reference_rows
    assert _rows(tmp_path / "generations.parquet") == reference_rows


@pytest.mark.engine
def test_eval_end_to_end_with_local_judge(tiny_model, make_ckpt, concepts_file, tmp_path):
    from tests.judge_server import ScriptedJudge

    ckpt = make_ckpt(num_blocks=1)
    with ScriptedJudge() as judge:
        cmd = [sys.executable, "-m", "flas_vllm.cli", "eval", "--out", str(tmp_path), "--model", str(tiny_model),
               "--flas-checkpoint", str(ckpt), "--concepts", str(concepts_file), "--num-prompts", "2",
               "--flowtimes", "0.5,1.5", "--max-tokens", "8", "--base-url", judge.base_url,
               "--judge-model", "scripted", *ENGINE]
        subprocess.run(cmd, check=True, timeout=900, env={**os.environ, "OPENAI_API_KEY": "x"})
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["summary"]
    assert summary["n_concepts"] == N_CONCEPTS and summary["judge_failures"] == 0
    assert summary["hmean"] == pytest.approx(2.0)  # the scripted judge rates everything 2
    assert (tmp_path / "report" / "scores_by_flowtime.png").stat().st_size > 1000
    assert "| hmean |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.engine
def test_quickstart_path_bundled_concepts_and_the_offline_judge(tiny_model, make_ckpt, tmp_path):
    """The README quickstart's command: no --concepts (bundled Concept500), --num-concepts, --local-judge."""
    ckpt = make_ckpt(num_blocks=1)
    cmd = [sys.executable, "-m", "flas_vllm.cli", "eval", "--out", str(tmp_path), "--model", str(tiny_model),
           "--flas-checkpoint", str(ckpt), "--num-concepts", "3", "--num-prompts", "2", "--flowtimes", "0,1.5",
           "--max-tokens", "8", "--local-judge", *ENGINE]
    subprocess.run(cmd, check=True, timeout=900)
    gens = pq.read_table(tmp_path / "generate" / "generations.parquet").to_pylist()
    again = subprocess.run(cmd, check=True, timeout=900, capture_output=True, text=True)
    assert '"judged": 0, "failed": 0, "skipped": 12' in again.stdout  # everything resumed as done
    assert "EngineCore" not in again.stderr  # a finished generate stage starts no engine
    assert pq.read_table(tmp_path / "generate" / "generations.parquet").to_pylist() == gens
    assert sorted({r["concept_id"] for r in gens}) == [0, 1, 2] and len(gens) == 3 * 2 * 2
    from flas_vllm.judge import latest_judgements

    judged = latest_judgements(tmp_path / "judge").values()
    assert {r["judge_model"] for r in judged} == {"flas-lexical-judge"}
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["summary"]
    assert summary["n_concepts"] == 3 and summary["judge_failures"] == 0


def test_fixture_alias_is_resolved_only_when_asked_for(monkeypatch, tmp_path):
    import typer

    from flas_vllm import cli, fixtures

    def no_build(*a, **k):
        raise AssertionError("the fixture must not be built for a real model")

    monkeypatch.setattr(fixtures, "ensure_tiny_gemma2", no_build)
    monkeypatch.chdir(tmp_path)  # no directory called 'fixture' here
    args = dict(concepts=tmp_path / "c.txt", prompts=tmp_path / "p.json", num_prompts=1, flowtimes="1",
                max_tokens=4, temperature=0.0, top_p=1.0, seed=0, dtype="auto", max_model_len=None, eager=True,
                kv_cache_memory_bytes=None, max_concepts=None)
    spec = cli._spec("google/gemma-2-2b-it", "flas-ai/flas-gemma-2-2b-it", **args)
    assert spec.model == "google/gemma-2-2b-it" and "kv_cache_memory_bytes" not in spec.engine_kwargs
    with pytest.raises(typer.BadParameter, match="--model fixture"):
        cli._spec("google/gemma-2-2b-it", "fixture", **args)
    monkeypatch.setattr(fixtures, "ensure_tiny_gemma2", lambda *a, **k: tmp_path / "tiny")
    spec = cli._spec("fixture", "/some/ckpt", **args)
    assert spec.model == str(tmp_path / "tiny") and spec.checkpoint == "/some/ckpt"
    assert spec.engine_kwargs["kv_cache_memory_bytes"] == cli.FIXTURE_KV_BYTES
