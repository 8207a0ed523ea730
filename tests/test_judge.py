"""The judge against a scripted local OpenAI-compatible server: parsing, retries, failures kept and retried."""

from __future__ import annotations

import pytest

from flas_vllm.eval.judge import JudgeSettings, MixedJudgesError, judge, latest_judgements, parse_rating, public_endpoint
from tests.judge_server import SPELLINGS, ScriptedJudge


def _row(i, text, concept="pirates"):
    return {"concept_id": i // 2, "concept": concept, "prompt_id": i, "prompt": "Say hi", "flowtime": 1.0,
            "generation": text, "finish_reason": "length", "n_tokens": 3, "seed": i, "checkpoint": "ck",
            "prompt_position": i % 2}


@pytest.mark.parametrize(("text", "expected"), [
    # spec section 7: the first line after the LAST "Rating:", [ and ] removed, then a trailing ".", quotes
    # and "*" stripped (in that order), read as a float in 0..2
    ("blah Rating: [[2]]", 2.0),
    ("Rating: 2", 2.0),
    ("Rating: **2**", 2.0),
    ("Rating: [2]", 2.0),
    ("Rating: [[1.5]]", 1.5),
    ("Rating: 1.", 1.0),
    ("Rating: [[0]].", 0.0),
    ('Rating: "2"', 2.0),
    ("Rating: '1'", 1.0),
    ('Rating: "**2**"', 2.0),
    ("Rating: **[[1]]**", 1.0),
    ("Rating:\n  2\nbecause ...", 2.0),  # the text after the marker is stripped before its first line is taken
    ("Rating: [[2]]\nThe fragment mentions it twice.", 2.0),
    ("Rating: [[ 1 ]] then Rating: [[0]]", 0.0),  # the last one counts
    ("Rating: [[2]]\nLet me reconsider. Rating: unclear", None),  # a later unparseable one fails the answer
    ("Rating: [[3]]", None),  # outside 0..2
    ("Rating: -1", None),
    ("Rating: 2/2", None),
    ("Rating: 2 out of 2", None),
    ("Rating: **'2'**", None),  # quotes go before stars: these stay and the float fails
    ("rating: 2", None),  # case-sensitive marker
    ("I rate it 2.", None),
    ("", None),
    (None, None),
])
def test_parse_rating_lenient_rule_of_the_original(text, expected):
    assert parse_rating(text) == expected


def test_stand_in_spellings_are_pinned_by_hand():
    """The scripted judge's table of spellings, read by the parser: the values written next to them by hand."""
    assert [parse_rating(text) for text, _ in SPELLINGS] == [value for _, value in SPELLINGS]
    assert sum(v is None for _, v in SPELLINGS) >= 5 and sum(v is not None for _, v in SPELLINGS) >= 12


def test_judge_reads_every_accepted_spelling_over_http(tmp_path):
    """60 rows judged by a server answering in every spelling (and sometimes none): exactly the rows whose
    answer has no usable rating fail; the rest carry the ratings the original's rule reads."""
    rows = [_row(i, f"Generated text SPELLING{i % len(SPELLINGS)} here.") for i in range(60)]
    with ScriptedJudge() as server:
        settings = JudgeSettings(base_url=server.base_url, model="scripted", concurrency=8, max_attempts=2,
                                 backoff_seconds=0.01, timeout_seconds=10)
        stats = judge(rows, tmp_path, settings, progress=False)
    expected = {i: SPELLINGS[i % len(SPELLINGS)][1] for i in range(60)}
    n_fail = sum(v is None for v in expected.values())
    assert stats == {"judged": 60, "failed": n_fail, "skipped": 0}
    got = {k[1]: v for k, v in latest_judgements(tmp_path).items()}
    for pid, value in expected.items():
        r = got[pid]
        assert r["judge_failed"] == (value is None), (pid, r["judge_error"])
        assert [r["concept_score"], r["instruction_score"], r["fluency_score"]] == [value] * 3


def test_judge_retries_keeps_failures_and_retries_them_on_resume(tmp_path):
    rows = [_row(0, "GOOD text"), _row(1, "OKAY text"), _row(2, "FLAKY text"), _row(3, "SLOW text"),
            _row(4, "MALFORMED text"), _row(5, "DOWN text")]
    with ScriptedJudge() as server:
        settings = JudgeSettings(base_url=server.base_url, model="judge", concurrency=4, max_attempts=3,
                                 backoff_seconds=0.01, timeout_seconds=10)
        stats = judge(rows, tmp_path, settings, progress=False)
        assert stats == {"judged": 6, "failed": 2, "skipped": 0}
        got = latest_judgements(tmp_path)
        assert len(got) == 6  # nothing dropped
        by_pid = {k[1]: v for k, v in got.items()}
        assert by_pid[0]["concept_score"] == 2 and not by_pid[0]["judge_failed"]
        assert by_pid[1]["fluency_score"] == 1
        assert not by_pid[2]["judge_failed"]  # 429s were retried
        assert server.calls["FLAKY"] == 3 + 2  # three aspects, two 429s first
        assert by_pid[4]["judge_failed"] and "unparseable" in by_pid[4]["judge_error"]
        assert by_pid[4]["concept_score"] is None  # a failure is never a silent 0
        assert by_pid[5]["judge_failed"] and "InternalServerError" in by_pid[5]["judge_error"]
        assert server.calls["MALFORMED"] == 3 * 3  # every aspect tried max_attempts times

        before = dict(server.calls)
        server.heal()
        stats = judge(rows, tmp_path, settings, progress=False)
        assert stats == {"judged": 2, "failed": 0, "skipped": 4}  # only the failures are judged again
        assert server.calls["GOOD"] == before["GOOD"]
        got = latest_judgements(tmp_path)
        assert len(got) == 6 and not any(r["judge_failed"] for r in got.values())


def test_client_errors_are_not_retried(tmp_path):
    with ScriptedJudge() as server:
        settings = JudgeSettings(base_url=server.base_url.replace("/v1", "/nope"), model="judge",
                                 max_attempts=4, backoff_seconds=0.01)
        stats = judge([_row(0, "GOOD")], tmp_path, settings, progress=False)
        assert stats["failed"] == 1
        row = next(iter(latest_judgements(tmp_path).values()))
        assert row["judge_failed"] and "HTTP" in row["judge_error"]


def test_lexical_judge_reads_axbench_templates():
    from flas_vllm.eval.judge import load_templates
    from flas_vllm.eval.lexical_judge import rate

    t = load_templates()
    pirate = "Arr, the pirate ship sailed across the stormy ocean with its treasure."
    assert parse_rating(rate(t["concept"].format(concept="pirates and ocean treasure", sentence=pirate))) == 2
    assert parse_rating(rate(t["concept"].format(concept="pirates and income taxation law", sentence=pirate))) == 1
    assert parse_rating(rate(t["concept"].format(concept="C++ template syntax", sentence=pirate))) == 0
    assert parse_rating(rate(t["instruction"].format(instruction="Describe a pirate ship.", sentence=pirate))) == 2
    assert parse_rating(rate(t["fluency"].format(sentence=pirate))) == 2
    assert parse_rating(rate(t["fluency"].format(sentence="the the the the the the the the"))) == 0
    assert parse_rating(rate(t["fluency"].format(sentence="<0x12> ## 77 }} ]] ::"))) == 0
    assert parse_rating(rate("rate this: hello")) is None  # not an AxBench template: no rating, a judge failure


def test_judge_cli_with_the_local_judge_and_its_option_errors(tmp_path):
    import json
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flas_vllm.eval.generate import GENERATION_SCHEMA

    gens = tmp_path / "generations.parquet"
    pq.write_table(pa.Table.from_pylist([_row(0, "Arr, pirates sail the ocean."), _row(1, "x")],
                                        schema=GENERATION_SCHEMA), gens)
    base = [sys.executable, "-m", "flas_vllm.cli", "judge", "--generations", str(gens), "--out", str(tmp_path / "j")]
    done = subprocess.run(base + ["--local-judge"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"judged": 2, "failed": 0, "skipped": 0}
    got = {k[1]: v for k, v in latest_judgements(tmp_path / "j").items()}
    assert got[0]["concept_score"] == 2 and got[0]["judge_model"] == "flas-lexical-judge"
    assert got[1]["fluency_score"] == 0

    for extra, needle in ((["--local-judge", "--base-url", "http://x/v1"], "--local-judge"),
                          (["--base-url", "http://x/v1"], "--judge-model"), ([], "--base-url")):
        bad = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr


def test_lexical_judge_server_rejects_bad_bodies_and_keeps_serving():
    import json
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from flas_vllm.eval.lexical_judge import lexical_judge_server

    def post(url, data: bytes):
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    with lexical_judge_server() as server:
        url = server.base_url + "/chat/completions"
        status, body = post(url, b"{not json")
        assert status == 400 and "not JSON" in body["error"]["message"]
        for bad in ({}, {"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}, [1]):
            status, body = post(url, json.dumps(bad).encode())
            assert status == 400 and body["error"]["message"].startswith("messages:"), (bad, body)
        status, body = post(server.base_url + "/completions", b"{}")
        assert status == 404
        ok = {"messages": [{"role": "user", "content": "[Sentence Fragment Start]\nHello there, friend.\n"
                                                       "[Sentence Fragment End]"}]}
        status, body = post(url, json.dumps(ok).encode())  # still serving after the bad requests
        assert status == 200 and parse_rating(body["choices"][0]["message"]["content"]) is not None

        port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
        busy = subprocess.run([sys.executable, "-m", "flas_vllm.cli", "judge-server", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and "--port" in busy.stderr and "cannot listen" in busy.stderr, busy.stderr


def test_rows_carry_judge_model_and_endpoint_without_credentials(tmp_path):
    with ScriptedJudge() as server:
        host = server.base_url.split("//", 1)[1]
        settings = JudgeSettings(base_url=f"http://user:secret@{host}", model="scripted-judge",
                                 max_attempts=1, backoff_seconds=0.01)
        assert judge([_row(0, "GOOD")], tmp_path, settings, progress=False)["failed"] == 0
    row = next(iter(latest_judgements(tmp_path).values()))
    assert row["judge_model"] == "scripted-judge" and row["judge_model_served"] == "scripted-judge"
    assert row["judge_endpoint"] == server.base_url  # no user:password
    assert "secret" not in str(row)
    assert public_endpoint("https://k:v@api.example.com:8443/v1?api-key=abc#x") == "https://api.example.com:8443/v1"


def test_judging_into_a_directory_of_another_judge_is_refused(tmp_path):
    rows = [_row(0, "GOOD"), _row(1, "MALFORMED")]
    with ScriptedJudge() as server:
        first = JudgeSettings(base_url=server.base_url, model="judge-a", max_attempts=1, backoff_seconds=0.01)
        assert judge(rows, tmp_path, first, progress=False)["failed"] == 1
        second = JudgeSettings(base_url=server.base_url, model="judge-b", max_attempts=1, backoff_seconds=0.01)
        with pytest.raises(MixedJudgesError, match=r"judge-a \(2 rows\).*judge-b"):
            judge(rows, tmp_path, second, progress=False)
        assert len(list(tmp_path.glob("part-*.parquet"))) == 1  # nothing written
        server.heal()
        stats = judge(rows, tmp_path, second, progress=False, allow_mixed=True)  # told to: retries the failure
    assert stats == {"judged": 1, "failed": 0, "skipped": 1}
    assert sorted(r["judge_model"] for r in latest_judgements(tmp_path).values()) == ["judge-a", "judge-b"]


def test_string_concept_ids_round_trip_through_the_judge(tmp_path):
    rows = [dict(_row(i, "GOOD"), concept_id=f"c{i // 2}a9f") for i in range(4)]
    with ScriptedJudge() as server:
        settings = JudgeSettings(base_url=server.base_url, model="j", max_attempts=1, backoff_seconds=0.01)
        judge(rows, tmp_path, settings, progress=False)
    assert sorted(k[0] for k in latest_judgements(tmp_path)) == ["c0a9f", "c0a9f", "c1a9f", "c1a9f"]
