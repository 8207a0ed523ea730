"""The flow on a step's steered tokens only (the skip path): rows gathered in, results scattered out.

Without CUDA graphs the flow runs eagerly inside the opaque op `vllm::flas_steer`, so it may take
any row count. `build_step` (step_state.py) records the steered tokens' indices in token order,
padded up to a bucket (`StepState.rows`); `integrate_rows` gathers the stream, positions, step
sizes and Euler steps of those rows, integrates them with the one flow of `core/flow.py`, and
scatters the steered rows back into a full-size output (the rows not steered are never selected by
the model's `torch.where`, so they stay unwritten).

Two things must still see every token of the step:
- the flow's paged self-attention (vLLM's `Attention`: its metadata, slot mapping and
  `query_start_loc` cover all scheduled tokens). `RowsCore` wraps each core: the compacted q/k/v are
  scattered into zero tensors of the step's size, attention runs on all of them, and the flow's rows
  are gathered back. A token not steered writes zeros into the flow's KV at its own cache slots,
  which no request ever reads (unsteered requests read no flow KV; the prefix cache is salted by steering).
- the slot table: it reads the compacted rows' slots from the state (`StepState.slots`).

The graph path (`graph_path`, CUDA graphs) passes `rows=None`: every token, as before.

`integrate_graph_rows` is what a FULL CUDA graph keyed by a steered bucket runs (graph_buckets.py):
the first b rows of the step's graph row order, all distinct, read from persistent buffers, no
host-side look at the step beyond b itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flas_vllm.core.eager_numerics import rounded
from flas_vllm.core.flow import ConceptKV, FlowFunction, SelfAttentionCore, integrate
from flas_vllm.engine.step_state import StepState


class RowsCore:
    """A self-attention core that needs every token, run on the flow's compacted rows.

    `rows` [R]: token index of each compacted row, the first `steered` distinct (the rest repeat one of
    them); `n_tokens`: the tokens the core's attention metadata covers.
    """

    def __init__(self, core: SelfAttentionCore, rows: torch.Tensor, steered: int, n_tokens: int):
        self.core, self.rows, self.steered, self.n_tokens = core, rows, steered, n_tokens

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(self.n_tokens, *x.shape[1:])
        return full.index_copy_(0, self.rows[: self.steered], x[: self.steered])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.core(self._full(q), self._full(k), self._full(v))
        return out.index_select(0, self.rows)


def rows_cores(cores: Sequence[Sequence[SelfAttentionCore | None]], rows: torch.Tensor, steered: int,
               n_tokens: int) -> list[list[RowsCore | None]]:
    """Each (Euler step, block) core wrapped for this step's rows."""
    return [[None if c is None else RowsCore(c, rows, steered, n_tokens) for c in step] for step in cores]


def integrate_rows(flow: FlowFunction, concept: ConceptKV, cores, state: StepState, positions: torch.Tensor,
                   stream: torch.Tensor, euler_steps: int, rows: torch.Tensor | None,
                   out: torch.Tensor | None = None, distinct: int | None = None) -> torch.Tensor:
    """The stream after the flow, in the stream's dtype: every token (`rows` None) or only `rows`.

    The result is full size (written into `out` when given); with `rows`, only their first `distinct`
    (default: the step's steered tokens) are written.
    """
    buffers = state.buffers
    if rows is None:
        n = stream.shape[0]
        h = integrate(flow, stream.to(flow.dtype), buffers.dt[:n], euler_steps, positions, concept, cores,
                      token_steps=buffers.euler_steps[:n])
        h = rounded(h.to(stream.dtype))
        return h if out is None else out.copy_(h)
    steered = state.steered_rows if distinct is None else distinct
    h = integrate(flow, stream.index_select(0, rows).to(flow.dtype), buffers.dt.index_select(0, rows), euler_steps,
                  positions.index_select(0, rows), concept, rows_cores(cores, rows, steered, stream.shape[0]),
                  token_steps=buffers.euler_steps.index_select(0, rows))
    out = torch.empty_like(stream) if out is None else out
    return out.index_copy_(0, rows[:steered], rounded(h[:steered].to(stream.dtype)))


def integrate_graph_rows(flow: FlowFunction, concept: ConceptKV, cores, state: StepState, positions: torch.Tensor,
                         stream: torch.Tensor, euler_steps: int, n_rows: int, out: torch.Tensor) -> torch.Tensor:
    """The flow on the first `n_rows` of the graph row order (the steered tokens, then distinct others),
    every row at `euler_steps` masked to its own: what a FULL graph captured for that bucket replays.

    All `n_rows` results are written into `out` (rows not steered are never selected by the model).
    """
    if n_rows >= stream.shape[0]:  # every token: no gather, no scatter
        with state.flow_on_rows(None, None):
            return integrate_rows(flow, concept, cores, state, positions, stream, euler_steps, None, out)
    rows = state.buffers.graph_rows[:n_rows]
    with state.flow_on_rows(rows, state.buffers.slot.index_select(0, rows)):
        return integrate_rows(flow, concept, cores, state, positions, stream, euler_steps, rows, out, distinct=n_rows)
