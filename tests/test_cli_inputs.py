"""CLI stages accept what the previous stage wrote; empty inputs and missing memory flags are clear."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flas_vllm.cli import app
from flas_vllm.eval.generate import GENERATION_SCHEMA, PartWriter, load_generations


def _rows(n):
    return [{"concept_id": i, "concept": "pirates", "prompt_id": i, "prompt": "Say hi", "flowtime": 1.0,
             "generation": "Arr, hello there matey.", "finish_reason": "length", "n_tokens": 5, "seed": i,
             "checkpoint": "ck", "prompt_position": 0} for i in range(n)]


def test_generate_output_directory_file_and_parts_are_all_accepted(tmp_path):
    out = tmp_path / "gen"
    PartWriter(out / "parts", GENERATION_SCHEMA).write(_rows(3))
    assert len(load_generations(out)) == 3  # parts only (a run that never merged)
    pq.write_table(pa.Table.from_pylist(_rows(4), schema=GENERATION_SCHEMA), out / "generations.parquet")
    assert len(load_generations(out)) == 4  # the merged file wins
    assert len(load_generations(out / "generations.parquet")) == 4
    assert len(load_generations(out / "parts")) == 3


def test_empty_or_missing_generations_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no generation rows"):
        load_generations(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        load_generations(tmp_path / "nope")


def test_judge_takes_the_directory_generate_wrote(tmp_path):
    out = tmp_path / "gen"
    PartWriter(out / "parts", GENERATION_SCHEMA).write(_rows(2))
    pq.write_table(pa.Table.from_pylist(_rows(2), schema=GENERATION_SCHEMA), out / "generations.parquet")
    res = CliRunner().invoke(app, ["judge", "--generations", str(out), "--out", str(tmp_path / "judge"),
                                   "--local-judge"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output[res.output.rindex("{"):])
    assert stats["judged"] == 2, stats
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["judge", "--generations", str(tmp_path / "empty"), "--out",
                                   str(tmp_path / "j2"), "--local-judge"])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())  # typer's error box, unwrapped
    assert res.exit_code == 2 and "no generation rows" in text and "--generations" in text


def test_cpu_engines_get_a_fixed_kv_budget_unless_told(tiny_model):
    from flas_vllm.engine.llm import CPU_DEFAULT_KV_CACHE_BYTES, flas_engine_kwargs

    m = str(tiny_model)
    assert flas_engine_kwargs(m, "c")["kv_cache_memory_bytes"] == CPU_DEFAULT_KV_CACHE_BYTES  # CPU here
    assert flas_engine_kwargs(m, "c", kv_cache_memory_bytes=5)["kv_cache_memory_bytes"] == 5
    assert "kv_cache_memory_bytes" not in flas_engine_kwargs(m, "c", gpu_memory_utilization=0.5)


def test_eval_is_the_three_stages_composed():
    """`eval` takes every option of generate, judge and score (from their signatures, not copies)."""
    from typer.main import get_command

    commands = get_command(app).commands
    names = {name: {p.name for p in commands[name].params} for name in ("generate", "judge", "score", "eval")}
    own = {"out", "generations", "judgements"}
    for stage in ("generate", "judge", "score"):
        assert names[stage] - own <= names["eval"], stage
    assert names["eval"] - names["generate"] - names["judge"] - names["score"] == set()
    for name in ("generate", "eval", "chat", "serve"):  # vLLM engine arguments pass through
        assert commands[name].context_settings.get("ignore_unknown_options"), name


@pytest.mark.parametrize("command, words", [("serve", "no-such-model': no such directory"),
                                            ("chat", "no-such-ckpt does not exist")])
def test_a_missing_model_or_checkpoint_is_one_line_naming_it(tmp_path, command, words):
    args = [command, str(tmp_path / "no-such-model"), "--flas-checkpoint", str(tmp_path / "no-such-ckpt")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    unwrapped = "".join(line.strip(" │") for line in result.output.splitlines())  # rich wraps the box
    assert words.replace(" ", "") in unwrapped.replace(" ", ""), result.output
