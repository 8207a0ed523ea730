"""AxBench scoring exactly as FLAS reports it (spec section 7), so its numbers equal the original's.

Per sample: HMean = 3 / (1/C + 1/I + 1/F), 0 if any score is 0. Per concept: a
prompt's id is its position in the concept's sampled list; sort the ids of its
judged samples; the first int(n * 0.5) (at least one) are "train", the rest
"test" (n < 2: the one prompt is both); the factor (flowtime) with the best mean
HMean on train wins, ties to the first factor in the order given; that concept's
test samples at that factor are kept. Headline HMean, C, I, F: the mean over ALL
kept test samples pooled across concepts. The mean of per-concept means and a
bootstrap CI (resampling concepts) are extra, separately named fields. Judge
failures are counted and left out of every mean, never scored as 0. Flowtime 0
rows are the unsteered baseline, a candidate factor only when listed as one.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from flas_vllm.eval.judge import check_one_judge, judge_models
from flas_vllm.eval.generate import ConceptId, id_sort_key

METRICS = ("hmean", "concept", "instruction", "fluency")
SPLIT_RATIO = 0.5


def hmean(c: float, i: float, f: float) -> float:
    if c <= 0 or i <= 0 or f <= 0:
        return 0.0
    return 3.0 / (1.0 / c + 1.0 / i + 1.0 / f)


@dataclass(frozen=True)
class Sample:
    concept_id: ConceptId
    prompt_position: int
    flowtime: float
    concept: float
    instruction: float
    fluency: float

    @property
    def hmean(self) -> float:
        return hmean(self.concept, self.instruction, self.fluency)

    def metric(self, name: str) -> float:
        return self.hmean if name == "hmean" else getattr(self, name)


def _mean(values: Sequence[float]) -> float:
    """numpy's mean (its pairwise summation), as the original computes it: equal inputs, equal bits."""
    return float(np.mean(values)) if len(values) else math.nan


def split_prompts(positions: Iterable[int]) -> tuple[list[int], list[int]]:
    """Sorted positions: the first int(n * 0.5) (at least one) train, the rest test; n < 2: both the same."""
    ids = sorted(set(positions))
    if len(ids) < 2:
        return ids, ids
    n_train = max(1, int(len(ids) * SPLIT_RATIO))
    return ids[:n_train], ids[n_train:]


def score_concept(samples: Sequence[Sample], factors: Sequence[float]) -> dict:
    """One concept's kept samples at candidate factors -> its best factor and its kept test samples."""
    rank = {t: k for k, t in enumerate(factors)}
    ordered = sorted((s for s in samples if s.flowtime in rank), key=lambda s: (s.prompt_position, rank[s.flowtime]))
    train_ids, test_ids = split_prompts(s.prompt_position for s in ordered)
    train, test = set(train_ids), set(test_ids)
    train_means = {}
    for t in factors:
        vals = [s.hmean for s in ordered if s.flowtime == t and s.prompt_position in train]
        if vals:
            train_means[t] = _mean(vals)
    best = None
    for t, m in train_means.items():  # the order given; strictly better replaces, so ties keep the first
        if best is None or m > train_means[best]:
            best = t
    kept = [s for s in ordered if s.flowtime == best and s.prompt_position in test]
    out = {"best_flowtime": best, "n_test": len(kept), "train_positions": train_ids, "test_positions": test_ids,
           "train_hmean_by_flowtime": train_means, "kept": kept}
    for m in METRICS:
        out[m] = _mean([s.metric(m) for s in kept])
    return out


def pooled(samples: Sequence[Sample]) -> dict:
    return {m: _mean([s.metric(m) for s in samples]) for m in METRICS} | {"n": len(samples)}


def bootstrap_ci(groups: Sequence[Sequence[float]], *, n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the pooled mean, resampling whole groups (concepts) with replacement."""
    groups = [(math.fsum(g), len(g)) for g in groups if len(g)]
    if not groups:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = []
    for _ in range(n):
        picks = [rng.choice(groups) for _ in groups]
        means.append(math.fsum(s for s, _ in picks) / sum(k for _, k in picks))
    means.sort()
    lo = means[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return (lo, hi)


def default_factors(samples: Iterable[Sample]) -> list[float]:
    """Every steered flowtime present, ascending: flowtime 0 is the baseline unless listed as a factor."""
    return sorted({s.flowtime for s in samples if s.flowtime != 0})


def score(samples: Sequence[Sample], *, factors: Sequence[float] | None = None,
          failures: Mapping[ConceptId, int] | None = None, seed: int = 0) -> dict:
    """The headline (pooled kept test samples), per-concept results, the extras, and the unsteered baseline."""
    factors = [float(t) for t in (default_factors(samples) if factors is None else factors)]
    if len(set(factors)) != len(factors):
        raise ValueError(f"--factors: a flowtime is listed twice in {factors}")
    fail_by_concept = dict(failures or {})
    by_concept: dict[ConceptId, list[Sample]] = defaultdict(list)
    for s in samples:
        by_concept[s.concept_id].append(s)
    for cid in fail_by_concept:
        by_concept.setdefault(cid, [])
    per_concept = {}
    for cid in sorted(by_concept, key=id_sort_key):
        per_concept[cid] = score_concept(by_concept[cid], factors) | {"judge_failures": fail_by_concept.get(cid, 0)}
    kept_groups = [r["kept"] for r in per_concept.values() if r["n_test"]]
    kept = [s for g in kept_groups for s in g]
    summary: dict = {
        "protocol": "FLAS/AxBench (flas-spec section 7): per concept, best factor on the train half of prompt "
                    "positions; headline = mean over all kept test samples pooled across concepts",
        "factors": factors, "n_concepts": len(per_concept), "n_concepts_scored": len(kept_groups),
        "n_samples": len(samples), "n_test_samples": len(kept), "judge_failures": sum(fail_by_concept.values()),
    }
    summary |= {m: v for m, v in pooled(kept).items() if m != "n"}
    summary["per_concept_mean"] = {m: _mean([r[m] for r in per_concept.values() if r["n_test"]]) for m in METRICS}
    summary["ci95_bootstrap_over_concepts"] = {
        m: list(bootstrap_ci([[s.metric(m) for s in g] for g in kept_groups], seed=seed)) for m in METRICS}
    summary["best_flowtime_counts"] = {repr(t): n for t, n in sorted(Counter(
        r["best_flowtime"] for r in per_concept.values() if r["best_flowtime"] is not None).items())}
    baseline = [s for s in samples if s.flowtime == 0]
    test_sets = {cid: set(r["test_positions"]) for cid, r in per_concept.items()}
    summary["unsteered_baseline"] = None if not baseline else {
        "all_prompts": pooled(baseline),
        "test_prompts": pooled([s for s in baseline if s.prompt_position in test_sets[s.concept_id]]),
    }
    by_t: dict[float, list[Sample]] = defaultdict(list)
    for s in samples:
        by_t[s.flowtime].append(s)
    summary["by_flowtime"] = {repr(t): pooled(ss) for t, ss in sorted(by_t.items())}
    for r in per_concept.values():
        del r["kept"]
    return {"summary": summary, "per_concept": per_concept}


def samples_from_rows(rows: Iterable[Mapping]) -> tuple[list[Sample], Counter]:
    """Judge rows -> scorable samples, and the judge failures left out, per concept."""
    samples, failures = [], Counter()
    for r in rows:
        if r.get("prompt_position") is None:
            raise ValueError(f"row (concept_id {r['concept_id']!r}, prompt_id {r['prompt_id']}) has no "
                             "prompt_position: it was generated before positions were recorded; the split needs "
                             "them, so generate and judge it again")
        if r.get("judge_failed"):
            failures[r["concept_id"]] += 1
            continue
        samples.append(Sample(r["concept_id"], int(r["prompt_position"]), float(r["flowtime"]),
                              float(r["concept_score"]), float(r["instruction_score"]), float(r["fluency_score"])))
    return samples, failures


def score_rows(rows: Sequence[Mapping], *, factors: Sequence[float] | None = None, allow_mixed_judges: bool = False,
               seed: int = 0, source: str = "the judgements") -> dict:
    """Judge rows -> scores, refusing rows from different judge models unless allowed; provenance in the summary."""
    check_one_judge(judge_models(rows), source, allow_mixed_judges)
    present = sorted({float(r["flowtime"]) for r in rows})
    missing = [t for t in factors or [] if float(t) not in present]
    if missing:  # a typo, not a factor whose samples all failed the judge
        raise ValueError(f"--factors: no row at flowtime {', '.join(f'{t:g}' for t in missing)} "
                         f"(flowtimes present: {', '.join(f'{t:g}' for t in present)})")
    samples, failures = samples_from_rows(rows)
    result = score(samples, factors=factors, failures=failures, seed=seed)
    result["summary"]["judge"] = {
        key: dict(Counter(r.get(key) or "unrecorded" for r in rows).most_common())
        for key in ("judge_model", "judge_model_served", "judge_endpoint")
    }
    return result


def write_reports(result: dict, out_dir: str | Path,
                  concept_names: Mapping[ConceptId, str] | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "markdown": out / "report.md", "plot": out / "scores_by_flowtime.png"}
    paths["summary"].write_text(json.dumps(_jsonable(result), indent=2, sort_keys=True))
    s = result["summary"]
    judges = s.get("judge", {})
    lines = [
        "# FLAS AxBench scores", "",
        f"Protocol: {s['protocol']}.", "",
        f"Factors (tie order): {', '.join(f'{t:g}' for t in s['factors'])}. {s['n_concepts_scored']} of "
        f"{s['n_concepts']} concepts scored; {s['n_test_samples']} kept test samples of {s['n_samples']} judged; "
        f"{s['judge_failures']} judge failures (excluded from every mean, retried on resume).", "",
    ]
    for key, label in (("judge_model", "judge model"), ("judge_model_served", "served as"),
                       ("judge_endpoint", "endpoint")):
        if judges.get(key):
            lines.append(f"- {label}: " + ", ".join(f"`{k}` ({n} rows)" for k, n in judges[key].items()))
    ci = s["ci95_bootstrap_over_concepts"]
    lines += ["", "| metric | pooled test samples (headline) | 95% CI (bootstrap over concepts) | "
                  "mean of per-concept means |", "|---|---|---|---|"]
    for m in METRICS:
        lines.append(f"| {m} | {s[m]:.3f} | [{ci[m][0]:.3f}, {ci[m][1]:.3f}] | {s['per_concept_mean'][m]:.3f} |")
    if s["unsteered_baseline"]:
        b = s["unsteered_baseline"]
        lines += ["", "Unsteered baseline (flowtime 0): " + "; ".join(
            f"{label} HMean {b[k]['hmean']:.3f}, C {b[k]['concept']:.3f}, I {b[k]['instruction']:.3f}, "
            f"F {b[k]['fluency']:.3f} (n {b[k]['n']})" for k, label in (("test_prompts", "test prompts"),
                                                                       ("all_prompts", "all prompts")))]
    lines += ["", "## Per concept", "", "| concept_id | concept | best flowtime | n test | judge failures | "
                                        "HMean | C | I | F |", "|---|---|---|---|---|---|---|---|---|"]
    for cid, r in result["per_concept"].items():
        name = (concept_names or {}).get(cid, "")
        bt = "" if r["best_flowtime"] is None else f"{r['best_flowtime']:g}"
        lines.append(f"| {cid} | {name} | {bt} | {r['n_test']} | {r['judge_failures']} | " +
                     " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    _plot(s["by_flowtime"], paths["plot"])
    return paths


def _plot(by_flowtime: Mapping[str, Mapping[str, float]], path: Path) -> None:
    import matplotlib  # optional: matplotlib (bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib (bench extra)

    ts = sorted(float(t) for t in by_flowtime)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METRICS:
        ax.plot(ts, [by_flowtime[repr(t)][m] for t in ts], marker="o", label=m)
    ax.set_xlabel("flowtime T")
    ax.set_ylabel("mean score (0..2)")
    ax.set_title("AxBench judge scores by flowtime")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
