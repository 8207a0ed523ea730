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

from flas_vllm.eval.generate import (
    GENERATION_SCHEMA, Concept, build_jobs, load_concepts, load_prompts, read_parts, request_seed, sample_prompt_ids,
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


def test_jobs_carry_the_position_in_the_sampled_list():
    prompts = load_prompts(DATA / "alpaca_eval.json")
    sampled = random.Random(17).sample(prompts, 5)
    jobs = build_jobs([Concept(17, "pirates")], prompts, [1.0, 2.0], 5, seed=0)
    assert sorted({j.prompt_position for j in jobs}) == [0, 1, 2, 3, 4]
    assert all(prompts[j.prompt_id] == sampled[j.prompt_position] == j.prompt for j in jobs)


def test_string_concept_ids_keep_their_type(tmp_path):
    prompts = load_prompts(DATA / "alpaca_eval.json")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text('{"concept_id": "3f2a9c", "concept": "pirates"}\n{"concept_id": "7", "concept": "sea"}\n')
    concepts = load_concepts(meta)
    assert [c.concept_id for c in concepts] == ["3f2a9c", "7"]  # "7" stays a string: it seeds the sample
    jobs = build_jobs(concepts, prompts, [1.0], 3, seed=0)
    assert [j.prompt for j in jobs if j.concept_id == "7"] == random.Random("7").sample(prompts, 3)
    assert random.Random("7").sample(range(805), 3) != random.Random(7).sample(range(805), 3)
    (tmp_path / "mixed.jsonl").write_text('{"concept_id": 1, "concept": "a"}\n{"concept_id": "b", "concept": "b"}\n')
    with pytest.raises(ValueError, match="mix integers and strings"):
        load_concepts(tmp_path / "mixed.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"concept_id": 1.5, "concept": "a"}\n')
    with pytest.raises(ValueError, match="row 0 has concept_id 1.5"):
        load_concepts(tmp_path / "bad.jsonl")


def test_string_ids_round_trip_through_parts_and_a_directory_holds_one_kind(tmp_path):
    import pyarrow as pa

    from flas_vllm.eval.pipeline import merge_generations
    from flas_vllm.eval.generate import PartWriter, schema_for_ids

    def gen_row(cid, pid):
        return {"concept_id": cid, "concept": "c", "prompt_id": pid, "prompt": "p", "flowtime": 1.0,
                "generation": "g", "finish_reason": "length", "n_tokens": 1, "seed": 0, "checkpoint": "ck",
                "prompt_position": 0}

    rows = [gen_row("b7", 3), gen_row("a1", 9)]
    PartWriter(tmp_path / "s", schema_for_ids(GENERATION_SCHEMA, ["b7", "a1"])).write(rows)
    merged = merge_generations([tmp_path / "s"], tmp_path / "g.parquet")
    assert merged.schema.field("concept_id").type == pa.string()
    assert [r["concept_id"] for r in pq.read_table(tmp_path / "g.parquet").to_pylist()] == ["a1", "b7"]
    PartWriter(tmp_path / "s", GENERATION_SCHEMA).write([gen_row(5, 1)])
    with pytest.raises(ValueError, match="both integer and string concept ids"):
        read_parts(tmp_path / "s", GENERATION_SCHEMA)


def test_concept_ids_files_bundled_lists_and_lookup(tmp_path):
    from flas_vllm.eval.concept_sets import BUNDLED_ID_LISTS, load_concept_ids, select_concepts

    lists = {name: load_concept_ids(name) for name in BUNDLED_ID_LISTS}
    assert set(lists) == {"c16k-2b-ho100", "c16k-2b-hi100", "c16k-9b-ho100", "c16k-9b-hi100"}
    for name, ids in lists.items():
        assert len(ids) == len(set(ids)) == 100 and all(type(i) is int for i in ids), name
    assert not set(lists["c16k-2b-ho100"]) & set(lists["c16k-2b-hi100"])
    assert lists["c16k-2b-ho100"][:3] == [80, 273, 275]  # the original's data/eval_c16k_2b_ho100.json
    assert load_concept_ids("eval_c16k_9b_hi100.json") == lists["c16k-9b-hi100"]

    concepts = [Concept(5, "five"), Concept(2, "two"), Concept(9, "nine")]  # file order is not id order
    assert [c.concept_id for c in select_concepts(concepts, num=2)] == [5, 2]
    (tmp_path / "ids.json").write_text("[9, 5]")
    assert [c.concept for c in select_concepts(concepts, ids=load_concept_ids(tmp_path / "ids.json"))] == \
        ["nine", "five"]  # the list's order
    with pytest.raises(ValueError, match=r"2 of 3 ids are not in m.jsonl: 404, 'x9'"):
        select_concepts(concepts, ids=[404, 2, "x9"], source="m.jsonl")
    with pytest.raises(ValueError, match=r"'9' .*match ids of the other type \(9\)"):
        select_concepts(concepts, ids=["9"])
    with pytest.raises(ValueError, match="give one of them"):
        select_concepts(concepts, ids=[5], num=1)
    for text, needle in (("[1, 2, 1]", "more than once: 1"), ("{}", "non-empty JSON list"), ("[]", "non-empty"),
                         ("[true]", "entry 0 is True"), ("[1,", "not JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=needle):
            load_concept_ids(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="c16k-2b-ho100"):
        load_concept_ids("c16k-2b-ho99")


def test_cli_refuses_unknown_concept_ids_before_any_engine(tmp_path):
    from typer.testing import CliRunner

    from flas_vllm.cli import app

    meta = tmp_path / "metadata.jsonl"
    meta.write_text('{"concept_id": 80, "concept": "pirates"}\n{"concept_id": 81, "concept": "sea"}\n')
    base = ["generate", "--out", str(tmp_path / "g"), "--model", str(tmp_path / "no-model"),
            "--flas-checkpoint", str(tmp_path / "no-ckpt"), "--concepts", str(meta)]
    res = CliRunner().invoke(app, base + ["--concept-ids-file", "c16k-2b-ho100"])
    assert res.exit_code == 2 and "99 of 100 ids are not in" in res.output and "273" in res.output, res.output
    res = CliRunner().invoke(app, base + ["--concept-ids-file", "c16k-2b-ho100", "--num-concepts", "1"])
    assert res.exit_code == 2 and "--num-concepts and --concept-ids-file" in res.output, res.output
    ev = ["eval", "--out", str(tmp_path / "e"), "--model", str(tmp_path / "no-model"), "--flas-checkpoint",
          str(tmp_path / "no-ckpt"), "--concepts", str(meta), "--local-judge"]
    res = CliRunner().invoke(app, ev + ["--flowtimes", "0,1", "--factors", "1,4"])
    assert res.exit_code == 2 and "--factors" in res.output and "4 not among --flowtimes" in res.output, res.output
    res = CliRunner().invoke(app, ev + ["--flowtimes", "0"])
    assert res.exit_code == 2 and "no flowtime above 0" in res.output, res.output
    assert not (tmp_path / "e").exists()


def test_readme_reproduction_command_and_its_counts():
    """The README's command for the original protocol on the Concept16k held-out list, and the numbers it states."""
    import re
    import shlex

    from flas_vllm.eval.concept_sets import load_concept_ids

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- original-protocol -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.replace("\\\n", " "))
    opts = {a: argv[k + 1] for k, a in enumerate(argv) if a.startswith("--") and k + 1 < len(argv)}
    assert argv[:2] == ["flas-vllm", "eval"]
    assert opts["--concept-ids-file"] == "c16k-2b-ho100" and opts["--num-prompts"] == "10"
    assert [float(t) for t in opts["--flowtimes"].split(",")] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert opts["--n-steps"] == "2" and opts["--max-tokens"] == "256" and opts["--temperature"] == "1.0"
    assert opts["--stop-rule"] == "original" and opts["--judge-model"] == "gpt-4o-mini"
    generations = len(load_concept_ids(opts["--concept-ids-file"])) * 10 * 5
    text = re.sub(r"\s+", " ", readme.split("<!-- original-protocol -->", 1)[1])
    assert f"{generations:,} generations" in text and f"{3 * generations:,} judge calls" in text


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

    from flas_vllm.eval.pipeline import GenerateSpec, run_generate_ray
    from flas_vllm.eval.generate import GenerationSettings

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
        # 4 shards for 2 actors: an actor still has work queued when the first part appears, so the kill
        # lands mid-run whatever the timing (with one shard each, both could finish first)
        table = run_generate_ray(spec, tmp_path, num_actors=2, shards_per_actor=2)
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
    from flas_vllm.eval.judge import latest_judgements

    judged = latest_judgements(tmp_path / "judge").values()
    assert {r["judge_model"] for r in judged} == {"flas-lexical-judge"}
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["summary"]
    assert summary["n_concepts"] == 3 and summary["judge_failures"] == 0


def test_fixture_alias_is_resolved_only_when_asked_for(monkeypatch, tmp_path):
    import typer

    from flas_vllm import cli_common
    from flas_vllm.fixtures import tiny_gemma2 as fixtures

    def no_build(*a, **k):
        raise AssertionError("the fixture must not be built for a real model")

    monkeypatch.setattr(fixtures, "ensure_tiny_gemma2", no_build)
    monkeypatch.chdir(tmp_path)  # no directory called 'fixture' here
    real = ("google/gemma-2-2b-it", "flas-ai/flas-gemma-2-2b-it")
    assert cli_common.resolve_fixture(*real) == real
    assert "kv_cache_memory_bytes" not in cli_common.engine_kwargs(real[0], [], eager=True)
    with pytest.raises(typer.BadParameter, match="--model fixture"):
        cli_common.resolve_fixture("google/gemma-2-2b-it", "fixture")
    monkeypatch.setattr(fixtures, "ensure_tiny_gemma2", lambda *a, **k: tmp_path / "tiny")
    assert cli_common.resolve_fixture("fixture", "/some/ckpt") == (str(tmp_path / "tiny"), "/some/ckpt")
    kw = cli_common.engine_kwargs("fixture", ["--max-num-seqs", "4"], eager=True)
    assert kw == {"kv_cache_memory_bytes": cli_common.FIXTURE_KV_BYTES, "max_model_len": 1024, "max_num_seqs": 4,
                  "enforce_eager": True}


def test_any_vllm_engine_argument_passes_through_and_unknown_ones_are_named():
    import typer

    from flas_vllm.cli_common import vllm_engine_args

    got = vllm_engine_args(["--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--quantization", "fp8",
                            "--dtype", "bfloat16"])
    assert got == {"gpu_memory_utilization": 0.5, "max_num_seqs": 8, "quantization": "fp8", "dtype": "bfloat16"}
    with pytest.raises(typer.BadParameter, match="--max-tokns"):
        vllm_engine_args(["--max-tokns", "3"])
