"""One measured run: throughput, TTFT/TPOT percentiles, ratios."""

from __future__ import annotations


import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence


# ---------------------------------------------------------------------------
# statistics


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float] | None:
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    out = {}
    for q in qs:
        pos = (len(vals) - 1) * q / 100.0  # linear interpolation, as numpy's default
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{q}"] = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
    return out


def to_ms(p: dict[str, float] | None) -> dict[str, float] | None:
    return None if p is None else {k: round(v * 1000.0, 3) for k, v in p.items()}


@dataclass
class RunResult:
    name: str
    kind: str  # vanilla | vanilla-equal-kv | flas-unsteered | flas-steered | flas-mixed | hf
    k: int | None
    concepts_used: int
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    ttft_ms: dict[str, float] | None = None
    tpot_ms: dict[str, float] | None = None
    encode_s: float = 0.0  # concept encoding done inside the timed run
    batches: int | None = None  # transformers path only
    reused_from_k: int | None = None  # transformers path: same batch structure as that K, not re-run
    notes: list[str] = field(default_factory=list)
    # mixed traffic (flas-mixed): how many requests were steered, and the unsteered ones' own decode speed
    steered_requests: int | None = None
    unsteered_tpot_ms: dict[str, float] | None = None
    # vanilla's TPOT p50 / the unsteered requests' TPOT p50: their decode speed as a fraction of vanilla's
    ratio_unsteered_speed_to_vanilla: float | None = None
    # the same, against the FLAS engine's own all-unsteered run: same engine, KV capacity and concurrency,
    # so only the steered neighbours differ (vanilla's larger KV cache runs more requests at once, each slower)
    ratio_unsteered_speed_to_unsteered_run: float | None = None
    # the same, against vanilla vLLM run at the FLAS engine's KV capacity (the same concurrency): the
    # like-for-like "unsteered requests in a mixed batch x vanilla"
    ratio_unsteered_speed_to_vanilla_at_flas_kv: float | None = None
    ratio_output_to_vanilla: float | None = None
    ratio_total_to_vanilla: float | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tok_s"] = round(self.output_tok_s, 3)
        d["total_tok_s"] = round(self.total_tok_s, 3)
        d["wall_s"] = round(self.wall_s, 4)
        d["encode_s"] = round(self.encode_s, 4)
        if self.encode_s > 0 and self.wall_s > self.encode_s:
            d["output_tok_s_excl_encode"] = round(self.output_tokens / (self.wall_s - self.encode_s), 3)
        return d


def vllm_latencies(outputs) -> tuple[dict | None, dict | None, list[str]]:
    """TTFT and TPOT from RequestOutput.metrics (vLLM's RequestStateStats, needs disable_log_stats=False).

    TTFT = first_token_latency (first output minus arrival: in an offline batch every
    request arrives at the start, so queueing is included); TPOT = (last_token_ts -
    first_token_ts) / (n - 1), engine-core timestamps.
    """
    ttft, tpot = [], []
    for o in outputs:
        m = getattr(o, "metrics", None)
        if m is None:
            continue
        if getattr(m, "first_token_latency", 0.0) > 0:
            ttft.append(m.first_token_latency)
        n = getattr(m, "num_generation_tokens", 0)
        first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
        if n > 1 and first > 0 and last >= first:
            tpot.append((last - first) / (n - 1))
    notes = []
    if not ttft:
        notes.append("TTFT not measured: RequestOutput.metrics missing (vLLM stats disabled?)")
    if not tpot:
        notes.append("TPOT not measured (needs >= 2 output tokens and RequestOutput.metrics)")
    return to_ms(percentiles(ttft)), to_ms(percentiles(tpot)), notes


