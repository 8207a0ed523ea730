"""FULL CUDA graphs keyed by the step's steered bucket: which flow row counts get a graph, which one a step uses.

A captured graph replays the work of its capture, so a FULL graph that holds the flow computes the
same rows at every replay. With `flow_graphs="bucketed"` (core/config.py) each FULL graph of N
tokens is captured once per bucket b of `flow_row_buckets(N)`, the flow computing the first b
entries of the step's graph row order (`StepBuffers.graph_rows`: the steered tokens first, then the
others), and a step replays the graph of the smallest bucket that holds its steered tokens
(`graph_flow_rows`): b = 0, no flow work at all, when nothing is steered (patches/graph_dispatch.py).

The ladder is {0, N} and N/8, N/4, N/2 (rounded up) where those are at least `min_bucket()` rows:
on an H200 the compiled, graphed flow costs nearly the same below 64 tokens (0.52-0.59 ms at
1-64 tokens, `../shared/docs/gpu-measurements.md`), so smaller buckets would add captures and save
nothing. That figure is the compiled flow's; a bucketed graph records the op's eager flow (more,
unfused kernels), whose floor may differ: to measure on a GPU. At most 5 graphs per captured
size, so capture takes up to 5x as many FULL graphs.
"""

from __future__ import annotations

import os

import numpy as np

BUCKET_FRACTIONS = (8, 4, 2)  # N/8, N/4, N/2
MIN_BUCKET = 64
MIN_BUCKET_ENV = "FLAS_VLLM_GRAPH_BUCKET_MIN"  # tests shrink it to see compaction on tiny batches


def min_bucket() -> int:
    raw = os.environ.get(MIN_BUCKET_ENV)
    if raw is None:
        return MIN_BUCKET
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MIN_BUCKET_ENV} must be an integer >= 1, got {raw!r}")
    return value


def flow_row_buckets(num_tokens: int, smallest: int | None = None) -> tuple[int, ...]:
    """The flow row counts a FULL graph of `num_tokens` tokens is captured with, ascending, 0 first."""
    smallest = min_bucket() if smallest is None else smallest
    sizes = {0, num_tokens} | {-(-num_tokens // f) for f in BUCKET_FRACTIONS if -(-num_tokens // f) >= smallest}
    return tuple(sorted(s for s in sizes if s <= num_tokens))


def graph_flow_rows(steered: int, num_tokens: int, smallest: int | None = None) -> int:
    """The bucket a step with `steered` steered tokens of `num_tokens` (padded) replays: the smallest that holds them."""
    if not 0 <= steered <= num_tokens:
        raise ValueError(f"steered tokens {steered} outside 0..{num_tokens}")
    return next(b for b in flow_row_buckets(num_tokens, smallest) if b >= steered)


def graph_row_order(steered: np.ndarray) -> np.ndarray:
    """The step's tokens, steered ones first (each part in token order): the first b rows of it are the
    steered tokens and b - steered distinct others, so the flow's scatter back never writes a row twice."""
    return np.concatenate([np.flatnonzero(steered), np.flatnonzero(~steered)])
