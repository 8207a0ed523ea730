"""AxBench scoring as FLAS reports it (spec section 7).

Per sample: HMean = 3 / (1/C + 1/I + 1/F), 0 if any score is 0. Per concept:
sort its prompt ids; the first half (at least one) is "train", the rest
"test"; pick the flowtime with the best mean HMean on train; report HMean, C,
I, F averaged over the test samples at that flowtime. Judge failures are
excluded from every mean and counted, never treated as 0.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

METRICS = ("hmean", "concept", "instruction", "fluency")


def hmean(c: float, i: float, f: float) -> float:
    if c <= 0 or i <= 0 or f <= 0:
        return 0.0
    return 3.0 / (1.0 / c + 1.0 / i + 1.0 / f)


@dataclass(frozen=True)
class Sample:
    concept_id: int
    prompt_id: int
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
    return sum(values) / len(values) if values else math.nan


def split_prompts(prompt_ids: Iterable[int]) -> tuple[list[int], list[int]]:
    """Sorted ids; first half (at least one) train, the rest test."""
    ids = sorted(set(prompt_ids))
    n_train = max(1, len(ids) // 2)
    return ids[:n_train], ids[n_train:]


def score_concept(samples: Sequence[Sample]) -> dict:
    train_ids, test_ids = split_prompts(s.prompt_id for s in samples)
    train_ids, test_ids = set(train_ids), set(test_ids)
    by_t: dict[float, list[Sample]] = defaultdict(list)
    for s in samples:
        by_t[s.flowtime].append(s)
    train_means = {t: _mean([s.hmean for s in ss if s.prompt_id in train_ids]) for t, ss in by_t.items()}
    candidates = {t: m for t, m in train_means.items() if not math.isnan(m)}
    if not candidates:
        return {"best_flowtime": None, "n_test": 0, **{m: math.nan for m in METRICS},
                "train_hmean_by_flowtime": train_means}
    best_value = max(candidates.values())
    best_t = min(t for t, m in candidates.items() if m == best_value)  # ties: the gentler flowtime
    test = [s for s in by_t[best_t] if s.prompt_id in test_ids]
    out = {"best_flowtime": best_t, "n_test": len(test), "train_hmean_by_flowtime": train_means}
    for m in METRICS:
        out[m] = _mean([s.metric(m) for s in test])
    return out


def bootstrap_ci(values: Sequence[float], *, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean, resampling concepts."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(_mean([rng.choice(vals) for _ in vals]) for _ in range(n))
    lo = means[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return (lo, hi)


def score(samples: Sequence[Sample], *, failures: int = 0, seed: int = 0) -> dict:
    by_concept: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_concept[s.concept_id].append(s)
    per_concept = {cid: score_concept(ss) for cid, ss in sorted(by_concept.items())}
    summary: dict = {"n_concepts": len(per_concept), "n_samples": len(samples), "judge_failures": failures}
    scored = [r for r in per_concept.values() if r["n_test"] > 0]
    summary["n_concepts_scored"] = len(scored)
    for m in METRICS:
        vals = [r[m] for r in scored]
        summary[m] = _mean(vals)
        summary[f"{m}_ci95"] = list(bootstrap_ci(vals, seed=seed))
    by_t: dict[float, list[Sample]] = defaultdict(list)
    for s in samples:
        by_t[s.flowtime].append(s)
    summary["by_flowtime"] = {
        repr(t): {m: _mean([s.metric(m) for s in ss]) for m in METRICS} | {"n": len(ss)}
        for t, ss in sorted(by_t.items())
    }
    return {"summary": summary, "per_concept": per_concept}


def samples_from_rows(rows: Iterable[Mapping]) -> tuple[list[Sample], int]:
    """Judge rows -> scorable samples, and the number of judge failures left out."""
    samples, failures = [], 0
    for r in rows:
        if r.get("judge_failed"):
            failures += 1
            continue
        samples.append(Sample(int(r["concept_id"]), int(r["prompt_id"]), float(r["flowtime"]),
                              float(r["concept_score"]), float(r["instruction_score"]), float(r["fluency_score"])))
    return samples, failures


def write_reports(result: dict, out_dir: str | Path, concept_names: Mapping[int, str] | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "markdown": out / "report.md", "plot": out / "scores_by_flowtime.png"}
    paths["summary"].write_text(json.dumps(_jsonable(result), indent=2, sort_keys=True))
    s = result["summary"]
    lines = [
        "# FLAS AxBench scores", "",
        f"{s['n_concepts_scored']} of {s['n_concepts']} concepts scored on held-out prompts; "
        f"{s['n_samples']} judged samples; {s['judge_failures']} judge failures (excluded, retried on resume).", "",
        "| metric | mean | 95% CI (bootstrap over concepts) |", "|---|---|---|",
    ]
    for m in METRICS:
        lo, hi = s[f"{m}_ci95"]
        lines.append(f"| {m} | {s[m]:.3f} | [{lo:.3f}, {hi:.3f}] |")
    lines += ["", "## Per concept", "", "| concept_id | concept | best flowtime | n test | HMean | C | I | F |",
              "|---|---|---|---|---|---|---|---|"]
    for cid, r in result["per_concept"].items():
        name = (concept_names or {}).get(cid, "")
        bt = "" if r["best_flowtime"] is None else f"{r['best_flowtime']:g}"
        lines.append(f"| {cid} | {name} | {bt} | {r['n_test']} | " +
                     " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    _plot(s["by_flowtime"], paths["plot"])
    return paths


def _plot(by_flowtime: Mapping[str, Mapping[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
