"""Scoring against an independent implementation of spec section 7 (exact fractions, written here) and
hand-computed cases: position split, n = 1 and odd n, unequal failures per concept, ties, flowtime 0, pooling."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from flas_vllm.eval.score import bootstrap_ci, hmean, score_rows, split_prompts

ASPECTS = ("concept_score", "instruction_score", "fluency_score")


# -- the reference: spec section 7 as written, nothing shared with flas_vllm.eval.score ------------------------------


def ref_hmean(row) -> Fraction:
    c, i, f = (Fraction(row[a]) for a in ASPECTS)
    return Fraction(0) if 0 in (c, i, f) else 3 / (1 / c + 1 / i + 1 / f)


def ref_mean(values):
    return sum(values, Fraction(0)) / len(values)


def reference_score(rows, factors):
    """Judge failures out; per concept: positions of its judged samples sorted, the first int(n/2) (>= 1) train,
    n < 2 both; best factor on mean train HMean, the earliest listed wins ties; headline = mean of the pooled
    kept test samples; also the mean of per-concept means."""
    ok = [r for r in rows if not r["judge_failed"] and r["flowtime"] in factors]
    pooled, per_concept = [], []
    for cid in {r["concept_id"] for r in ok}:
        mine = [r for r in ok if r["concept_id"] == cid]
        positions = sorted({r["prompt_position"] for r in mine})
        if len(positions) < 2:
            train = test = set(positions)
        else:
            cut = max(1, int(len(positions) * 0.5))
            train, test = set(positions[:cut]), set(positions[cut:])
        best = best_mean = None
        for t in factors:
            vals = [ref_hmean(r) for r in mine if r["flowtime"] == t and r["prompt_position"] in train]
            if vals and (best is None or ref_mean(vals) > best_mean):
                best, best_mean = t, ref_mean(vals)
        kept = [r for r in mine if r["flowtime"] == best and r["prompt_position"] in test]
        pooled += kept
        if kept:
            per_concept.append(ref_mean([ref_hmean(r) for r in kept]))
    if not pooled:
        return {"n_test_samples": 0}
    out = {"hmean": ref_mean([ref_hmean(r) for r in pooled]), "n_test_samples": len(pooled),
           "per_concept_hmean": ref_mean(per_concept)}
    for a in ASPECTS:
        out[a.split("_")[0]] = ref_mean([Fraction(r[a]) for r in pooled])
    return out


# -- rows ---------------------------------------------------------------------------------------------------------


def row(cid, pos, t, c=2, i=2, f=2, failed=False, prompt_id=None, model="gpt-4o-mini"):
    return {"concept_id": cid, "concept": f"concept {cid}", "prompt_id": 100 + pos if prompt_id is None else prompt_id,
            "prompt_position": pos, "flowtime": float(t),
            "concept_score": None if failed else c, "instruction_score": None if failed else i,
            "fluency_score": None if failed else f, "judge_failed": failed, "judge_model": model,
            "judge_endpoint": "https://api.openai.com/v1", "judge_model_served": model}


def headline(rows, factors=None):
    return score_rows(rows, factors=factors)["summary"]


# -- hand-computed cases --------------------------------------------------------------------------------------------


def test_hmean_and_zero_rule():
    assert hmean(2, 2, 2) == pytest.approx(2.0)
    assert hmean(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))  # 1.5
    assert hmean(0, 2, 2) == 0.0 and hmean(2, 0, 1) == 0.0 and hmean(2, 1, 0) == 0.0


def test_split_first_half_train_at_least_one_and_a_single_prompt_is_both():
    assert split_prompts([3, 1, 2, 0]) == ([0, 1], [2, 3])
    assert split_prompts([4, 0, 2]) == ([0], [2, 4])  # int(1.5) = 1
    assert split_prompts([0, 1, 2, 3, 4]) == ([0, 1], [2, 3, 4])  # int(2.5) = 2
    assert split_prompts(range(7)) == ([0, 1, 2], [3, 4, 5, 6])
    assert split_prompts([4]) == ([4], [4])


def test_headline_pools_test_samples_when_failures_leave_unequal_counts():
    rows = [
        # concept 5: train (positions 0,1) prefers T=1 (2 vs 1); at T=1 its test position 3 failed -> 1 kept sample
        row(5, 0, 1), row(5, 1, 1), row(5, 2, 1), row(5, 3, 1, failed=True),
        *(row(5, p, 2, 1, 1, 1) for p in range(4)),
        # concept 9: train prefers T=2 (1.5 vs 1); test at T=2: hmean 1 and 0 -> 2 kept samples
        *(row(9, p, 1, 1, 1, 1) for p in range(4)),
        row(9, 0, 2, 1, 2, 2), row(9, 1, 2, 1, 2, 2), row(9, 2, 2, 1, 1, 1), row(9, 3, 2, 0, 2, 2),
    ]
    s = headline(rows)
    assert s["n_test_samples"] == 3 and s["judge_failures"] == 1
    assert s["hmean"] == pytest.approx((2 + 1 + 0) / 3)  # pooled: 1.0
    assert s["concept"] == pytest.approx(1.0)
    assert s["instruction"] == pytest.approx(5 / 3) and s["fluency"] == pytest.approx(5 / 3)
    assert s["per_concept_mean"]["hmean"] == pytest.approx((2 + 0.5) / 2)  # the extra field: 1.25
    assert s["best_flowtime_counts"] == {"1.0": 1, "2.0": 1}
    ref = reference_score(rows, [1.0, 2.0])
    assert s["hmean"] == pytest.approx(float(ref["hmean"])) and ref["hmean"] == 1


def test_split_is_on_positions_in_the_sampled_list_not_file_indices():
    # positions 0..3 hold AlpacaEval file indices 700, 12, 305, 44: by position train = {0, 1}
    files = [700, 12, 305, 44]
    rows = [row(0, 0, 1, prompt_id=files[0]), row(0, 1, 1, prompt_id=files[1]),
            row(0, 2, 1, 0, 2, 2, prompt_id=files[2]), row(0, 3, 1, 0, 2, 2, prompt_id=files[3]),
            *(row(0, p, 2, 1, 1, 1, prompt_id=files[p]) for p in range(4))]
    s = headline(rows)
    # train at T=1 is 2.0 (vs 1.0): T=1 wins; test positions 2, 3 at T=1 both rate 0. (By file index the train
    # half would be positions 1 and 3, a tie, and the test HMean 1.0.)
    assert s["hmean"] == 0.0 and s["n_test_samples"] == 2


def test_ties_go_to_the_first_factor_in_the_order_given():
    rows = [row(0, 0, 2), row(0, 1, 2, 1, 1, 1), row(0, 0, 1), row(0, 1, 1)]  # train (position 0) ties at 2.0
    assert headline(rows, factors=[2.0, 1.0])["hmean"] == pytest.approx(1.0)
    assert headline(rows, factors=[1.0, 2.0])["hmean"] == pytest.approx(2.0)
    assert score_rows(rows, factors=[2.0, 1.0])["per_concept"][0]["best_flowtime"] == 2.0


def test_a_single_prompt_is_both_train_and_test():
    rows = [row(3, 0, 1, 1, 2, 2), row(3, 0, 2)]
    result = score_rows(rows)
    assert result["per_concept"][3]["best_flowtime"] == 2.0 and result["per_concept"][3]["n_test"] == 1
    assert result["summary"]["hmean"] == pytest.approx(2.0)


def test_odd_n_and_a_prompt_lost_to_failures_everywhere():
    # five prompts: train = positions 0, 1; test = 2, 3, 4
    rows = [row(0, 0, 1), row(0, 1, 1), row(0, 2, 1, 1, 1, 1), row(0, 3, 1, 1, 2, 2), row(0, 4, 1, 0, 1, 1)]
    assert headline(rows)["hmean"] == pytest.approx((1 + 1.5 + 0) / 3)
    # position 1 failed at every flowtime: the split runs over the judged positions {0, 2, 3, 4} (as the original's
    # does): train = 0, 2; test = 3, 4
    rows[1] = row(0, 1, 1, failed=True)
    s = headline(rows)
    assert s["n_test_samples"] == 2 and s["hmean"] == pytest.approx((1.5 + 0) / 2)
    assert s["hmean"] == pytest.approx(float(reference_score(rows, [1.0])["hmean"]))


def test_flowtime_zero_is_the_baseline_unless_listed_as_a_factor():
    rows = [row(0, 0, 0), row(0, 1, 0), row(0, 0, 1, 1, 1, 1), row(0, 1, 1, 1, 2, 2)]
    s = headline(rows)
    assert s["factors"] == [1.0] and s["hmean"] == pytest.approx(1.5)
    assert s["unsteered_baseline"]["test_prompts"] == {"hmean": 2.0, "concept": 2.0, "instruction": 2.0,
                                                       "fluency": 2.0, "n": 1}
    assert s["unsteered_baseline"]["all_prompts"]["n"] == 2
    assert headline(rows, factors=[0.0, 1.0])["hmean"] == pytest.approx(2.0)  # listed: the unsteered model wins
    with pytest.raises(ValueError, match=r"--factors: no row at flowtime 3"):
        headline(rows, factors=[1.0, 3.0])


def test_string_concept_ids_score_like_integers():
    rows = [row("9fa1c3", p, t, *(2, 2, 2) if t == 1 else (1, 1, 1)) for p in range(2) for t in (1, 2)]
    result = score_rows(rows)
    assert result["per_concept"]["9fa1c3"]["best_flowtime"] == 1.0 and result["summary"]["hmean"] == 2.0


def test_rows_without_positions_are_refused():
    old = row(0, 0, 1)
    old["prompt_position"] = None
    with pytest.raises(ValueError, match="prompt_position"):
        score_rows([old])


# -- against the reference, many random runs ------------------------------------------------------------------------

# triples whose HMean (0, 1, 1.5, 2) and sums are exact in binary: float ties are then real ties
TRIPLES = [(0, 2, 2), (2, 0, 1), (1, 1, 0), (1, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1), (2, 2, 2)]


def random_run(rng):
    factors = rng.sample([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], rng.randint(1, 4))  # any order: it is the tie order
    string_ids = rng.random() < 0.3
    rows = []
    for k in range(rng.randint(1, 6)):
        cid = f"h{k:03x}" if string_ids else rng.randint(0, 16000)
        n = rng.randint(1, 11)
        for pos in range(n):
            for t in factors + ([0.0] if rng.random() < 0.3 else []):
                failed = rng.random() < 0.15
                rows.append(row(cid, pos, t, *rng.choice(TRIPLES), failed=failed, prompt_id=rng.randint(0, 804)))
    rng.shuffle(rows)  # row order must not matter
    return rows, factors


@pytest.mark.parametrize("seed", range(300))
def test_matches_the_reference_on_random_runs(seed):
    rng = random.Random(seed)
    rows, factors = random_run(rng)
    ref = reference_score(rows, factors)
    if ref["n_test_samples"] == 0:
        return
    s = score_rows(rows, factors=factors)["summary"]
    assert s["n_test_samples"] == ref["n_test_samples"]
    for m in ("hmean", "concept", "instruction", "fluency"):
        assert s[m] == pytest.approx(float(ref[m]), abs=1e-12), m
    assert s["per_concept_mean"]["hmean"] == pytest.approx(float(ref["per_concept_hmean"]), abs=1e-12)


# -- extras, provenance, reports -------------------------------------------------------------------------------------


def test_bootstrap_ci_over_concepts_of_the_pooled_mean():
    assert bootstrap_ci([[1.0, 1.0], [1.0]]) == (1.0, 1.0)
    lo, hi = bootstrap_ci([[0.0], [2.0]] * 20, n=500, seed=1)
    assert 0.6 < lo < 1.0 < hi < 1.4
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    s = headline([row(c, p, 1, *(2, 2, 2) if c % 2 else (1, 1, 1)) for c in range(10) for p in range(4)])
    lo, hi = s["ci95_bootstrap_over_concepts"]["hmean"]
    assert 1.0 <= lo <= s["hmean"] <= hi <= 2.0


def test_score_refuses_rows_from_different_judge_models_unless_told():
    rows = [row(0, p, 1) for p in range(4)] + [row(1, p, 1, model="claude-judge") for p in range(2)]
    with pytest.raises(ValueError, match=r"gpt-4o-mini \(4 rows\), claude-judge \(2 rows\).*--allow-mixed-judges"):
        score_rows(rows)
    s = score_rows(rows, allow_mixed_judges=True)["summary"]
    assert s["judge"]["judge_model"] == {"gpt-4o-mini": 4, "claude-judge": 2}
    assert s["judge"]["judge_endpoint"] == {"https://api.openai.com/v1": 6}


def test_reports_written(tmp_path):
    from flas_vllm.eval.score import write_reports

    rows = [row(0, 0, 1), row(0, 1, 1, 1, 2, 2), row(0, 0, 2, 2, 1, 1), row(0, 1, 2, 2, 2, 1), row(0, 1, 0)]
    paths = write_reports(score_rows(rows), tmp_path, {0: "pirates"})
    md = paths["markdown"].read_text()
    assert "pirates" in md and "pooled test samples (headline)" in md and "gpt-4o-mini" in md
    assert "Unsteered baseline" in md and "mean of per-concept means" in md
    assert paths["plot"].stat().st_size > 1000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert '"per_concept_mean"' in paths["summary"].read_text()


def test_score_cli_factors_and_judge_checks(tmp_path):
    from typer.testing import CliRunner

    from flas_vllm.cli import app
    from flas_vllm.eval.judge import JUDGE_SCHEMA
    from flas_vllm.eval.generate import PartWriter

    rows = [row(0, p, t) for p in range(2) for t in (1, 2)] + [row(1, p, 1, model="other") for p in range(2)]
    full = [{name: r.get(name) for name in JUDGE_SCHEMA.names} for r in rows]
    PartWriter(tmp_path / "j", JUDGE_SCHEMA).write(full)
    runner = CliRunner()
    base = ["score", "--judgements", str(tmp_path / "j"), "--out", str(tmp_path / "r")]
    res = runner.invoke(app, base)
    assert res.exit_code == 2 and "other (2 rows)" in res.output and "--allow-mixed-judges" in res.output
    res = runner.invoke(app, base + ["--allow-mixed-judges", "--factors", "2,1"])
    assert res.exit_code == 0, res.output
    assert "HMean 2.000 over 2 pooled test samples" in res.output
    res = runner.invoke(app, base + ["--allow-mixed-judges", "--factors", "1,4"])
    assert res.exit_code == 2 and "--factors" in res.output and "flowtime 4" in res.output
