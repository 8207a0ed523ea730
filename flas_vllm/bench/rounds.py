"""Rounds: the vLLM engines' whole sequence run several times, one round after another.

On a small, shared machine one round's ratios move by more than the differences they show (the README's
three runs of 2026-12-05: steered K = 64 at 0.72-0.83 of vanilla within 15 minutes). Each round's ratios
are side by side (vanilla, FLAS, vanilla at FLAS's KV capacity, minutes apart); the report keeps, for each
run, the median of the rounds' ratios, and every round's figures.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence

from flas_vllm.bench.results import RunResult

RATIO_FIELDS = ("ratio_output_to_vanilla", "ratio_total_to_vanilla", "ratio_unsteered_speed_to_vanilla",
                "ratio_unsteered_speed_to_unsteered_run", "ratio_unsteered_speed_to_vanilla_at_flas_kv")


def set_ratios(runs: Sequence[RunResult], vanilla: RunResult, unsteered: RunResult | None,
               equal_kv: RunResult | None) -> None:
    """Each run's ratios to vanilla, to the FLAS engine's all-unsteered run and to vanilla at FLAS's KV capacity."""
    for r in runs:
        r.ratio_output_to_vanilla = round(r.output_tok_s / vanilla.output_tok_s, 4)
        r.ratio_total_to_vanilla = round(r.total_tok_s / vanilla.total_tok_s, 4)
        if not r.unsteered_tpot_ms:
            continue
        for field, reference in (("ratio_unsteered_speed_to_vanilla", vanilla),
                                 ("ratio_unsteered_speed_to_unsteered_run", unsteered),
                                 ("ratio_unsteered_speed_to_vanilla_at_flas_kv", equal_kv)):
            if reference is not None and reference.tpot_ms:
                setattr(r, field, round(reference.tpot_ms["p50"] / r.unsteered_tpot_ms["p50"], 4))


def median_runs(rounds: Sequence[Sequence[RunResult]]) -> list[RunResult]:
    """One run per position of the rounds' (identical) run lists: the round at the median throughput, for its
    latencies and tokens/s, with every ratio replaced by the median of the rounds' ratios."""
    out = []
    for same in zip(*rounds, strict=True):
        ordered = sorted(same, key=lambda r: r.output_tok_s)
        pick = dataclasses.replace(ordered[(len(ordered) - 1) // 2])
        for field in RATIO_FIELDS:
            values = [getattr(r, field) for r in same]
            if all(v is not None for v in values):
                setattr(pick, field, round(statistics.median(values), 4))
        out.append(pick)
    return out


def round_record(runs: Sequence[RunResult], time: str) -> dict:
    """What the report keeps of one round: each run's tokens/s and ratios."""
    return {"time": time, "runs": {r.name: {"output_tok_s": round(r.output_tok_s, 3),
                                            **{f: getattr(r, f) for f in RATIO_FIELDS if getattr(r, f) is not None}}
                                   for r in runs}}
