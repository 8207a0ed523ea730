"""Scorer against hand-computed examples: HMean zeros, flowtime selection on train, test-half report, CI."""

from __future__ import annotations

import math

import pytest

from flas_vllm.score import Sample, bootstrap_ci, hmean, samples_from_rows, score, score_concept, split_prompts


def test_hmean_and_zero_rule():
    assert hmean(2, 2, 2) == pytest.approx(2.0)
    assert hmean(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))  # 1.5
    assert hmean(0, 2, 2) == 0.0 and hmean(2, 0, 1) == 0.0 and hmean(2, 1, 0) == 0.0


def test_split_first_half_train_at_least_one():
    assert split_prompts([7, 3, 5, 1]) == ([1, 3], [5, 7])
    assert split_prompts([9, 2, 4]) == ([2], [4, 9])
    assert split_prompts([4]) == ([4], [])


def _s(pid, t, c, i, f, cid=0):
    return Sample(cid, pid, t, c, i, f)


def test_best_flowtime_chosen_on_train_reported_on_test():
    # prompts 1,2 = train; 3,4 = test. T=1 is better on train (hmean 2 vs 1.5) but worse on test.
    samples = [
        _s(1, 1.0, 2, 2, 2), _s(2, 1.0, 2, 2, 2), _s(3, 1.0, 1, 1, 1), _s(4, 1.0, 0, 2, 2),
        _s(1, 2.0, 1, 2, 2), _s(2, 2.0, 1, 2, 2), _s(3, 2.0, 2, 2, 2), _s(4, 2.0, 2, 2, 2),
    ]
    r = score_concept(samples)
    assert r["best_flowtime"] == 1.0
    assert r["n_test"] == 2
    assert r["hmean"] == pytest.approx((1.0 + 0.0) / 2)  # test at T=1: hmean(1,1,1)=1, hmean(0,2,2)=0
    assert r["concept"] == pytest.approx(0.5) and r["instruction"] == pytest.approx(1.5)
    assert r["fluency"] == pytest.approx(1.5)
    assert r["train_hmean_by_flowtime"][2.0] == pytest.approx(1.5)


def test_ties_pick_the_smaller_flowtime():
    samples = [_s(1, 2.0, 2, 2, 2), _s(2, 2.0, 1, 1, 1), _s(1, 0.5, 2, 2, 2), _s(2, 0.5, 2, 2, 2)]
    assert score_concept(samples)["best_flowtime"] == 0.5


def test_summary_over_concepts_and_failures_excluded():
    rows = [
        {"concept_id": 0, "prompt_id": 1, "flowtime": 1.0, "concept_score": 2, "instruction_score": 2,
         "fluency_score": 2, "judge_failed": False},
        {"concept_id": 0, "prompt_id": 2, "flowtime": 1.0, "concept_score": 1, "instruction_score": 1,
         "fluency_score": 1, "judge_failed": False},
        {"concept_id": 1, "prompt_id": 5, "flowtime": 1.0, "concept_score": 2, "instruction_score": 2,
         "fluency_score": 2, "judge_failed": False},
        {"concept_id": 1, "prompt_id": 6, "flowtime": 1.0, "concept_score": 2, "instruction_score": 1,
         "fluency_score": 2, "judge_failed": False},
        {"concept_id": 1, "prompt_id": 7, "flowtime": 1.0, "concept_score": None, "instruction_score": None,
         "fluency_score": None, "judge_failed": True},
    ]
    samples, failures = samples_from_rows(rows)
    assert failures == 1 and len(samples) == 4  # a failure is never scored as 0
    result = score(samples, failures=failures)
    s = result["summary"]
    assert s["n_concepts_scored"] == 2 and s["judge_failures"] == 1
    # concept 0 test = prompt 2 -> 1.0; concept 1 test = prompt 6 -> hmean(2,1,2) = 1.5
    assert s["hmean"] == pytest.approx((1.0 + hmean(2, 1, 2)) / 2)
    lo, hi = s["hmean_ci95"]
    assert 1.0 <= lo <= s["hmean"] <= hi <= hmean(2, 1, 2)


def test_bootstrap_ci_degenerate_and_spread():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 2.0] * 20, n=500, seed=1)
    assert 0.6 < lo < 1.0 < hi < 1.4
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_reports_written(tmp_path):
    from flas_vllm.score import write_reports

    samples = [_s(1, 1.0, 2, 2, 2), _s(2, 1.0, 1, 2, 2), _s(1, 2.0, 2, 1, 1), _s(2, 2.0, 2, 2, 1)]
    paths = write_reports(score(samples), tmp_path, {0: "pirates"})
    assert "pirates" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 1000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert '"hmean"' in paths["summary"].read_text()
