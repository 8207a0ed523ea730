"""The flow on a step's steered tokens only (the skip path): rows gathered in, results scattered out.

Without CUDA graphs the flow runs eagerly inside the opaque op `vllm::flas_steer`, so it may take
any row count. `build_step` (step_state.py) records the steered tokens' indices in token order,
padded up to a bucket (`StepState.rows`); `integrate_rows` gathers the stream, positions, step
sizes and Euler steps of those rows, integrates them with the one flow of `core/flow.py`, and
scatters the steered rows back into a full-size output (the rows not steered are never selected by
the model's `torch.where`, so they stay unwritten).

Two things must still see the step's layout:
- the flow's paged self-attention (vLLM's `Attention`: its metadata, slot mapping and
  `query_start_loc` cover all scheduled tokens). Where the backend's metadata can be narrowed to the
  steered requests (steered_attention.py: vLLM's CPU, FlashAttention and Triton backends), each core takes
  the steered rows as they are. Otherwise `RowsCore` wraps each core: the compacted q/k/v are scattered
  into zero tensors of the step's size, attention runs on all of them, and the flow's rows are gathered
  back. A token not steered then writes zeros into the flow's KV at its own cache slots, which no request
  ever reads (unsteered requests read no flow KV; the prefix cache is salted by steering).
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

    `rows` [R]: token index of each compacted row, the first `steered` distinct (the rest repeat the last of
    them); `n_tokens`: the tokens the core's attention metadata covers. `narrowed`: the metadata covers the
    steered rows alone (steered_attention.py), so they go in as they are.
    """

    def __init__(self, core: SelfAttentionCore, rows: torch.Tensor, steered: int, n_tokens: int,
                 narrowed: bool = False):
        self.core, self.rows, self.steered, self.n_tokens, self.narrowed = core, rows, steered, n_tokens, narrowed

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(self.n_tokens, *x.shape[1:])
        return full.index_copy_(0, self.rows[: self.steered], x[: self.steered])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.narrowed:
            return self.core(self._full(q), self._full(k), self._full(v)).index_select(0, self.rows)
        s = self.steered
        out = self.core(q[:s], k[:s], v[:s])
        padding = self.rows.shape[0] - s  # rows repeating the last steered token
        return out if not padding else torch.cat((out, out[s - 1:].expand(padding, *out.shape[1:])))


def rows_cores(cores: Sequence[Sequence[SelfAttentionCore | None]], rows: torch.Tensor, steered: int,
               n_tokens: int, narrowed: bool = False) -> list[list[RowsCore | None]]:
    """Each (Euler step, block) core wrapped for this step's rows."""
    return [[None if c is None else RowsCore(c, rows, steered, n_tokens, narrowed) for c in step] for step in cores]


def integrate_rows(flow: FlowFunction, concept: ConceptKV, cores, state: StepState, positions: torch.Tensor,
                   stream: torch.Tensor, euler_steps: int, rows: torch.Tensor | None,
                   out: torch.Tensor | None = None, distinct: int | None = None,
                   narrowed: bool = False) -> torch.Tensor:
    """The stream after the flow, in the stream's dtype: every token (`rows` None) or only `rows`.

    The result is full size (written into `out` when given); with `rows`, only their first `distinct`
    (default: the step's steered tokens) are written. `narrowed`: the cores' attention metadata covers
    only the steered rows (steered_attention.py).
    """
    buffers = state.buffers
    if rows is None:
        n = stream.shape[0]
        h = integrate(flow, stream.to(flow.dtype), buffers.dt[:n], euler_steps, positions, concept, cores,
                      token_steps=buffers.euler_steps[:n], time_embedding=_time_embedding(state, buffers.time_row[:n]))
        h = rounded(h.to(stream.dtype))
        return h if out is None else out.copy_(h)
    steered = state.steered_rows if distinct is None else distinct
    h = integrate(flow, stream.index_select(0, rows).to(flow.dtype), buffers.dt.index_select(0, rows), euler_steps,
                  positions.index_select(0, rows), concept, rows_cores(cores, rows, steered, stream.shape[0], narrowed),
                  token_steps=buffers.euler_steps.index_select(0, rows),
                  time_embedding=_time_embedding(state, buffers.time_row.index_select(0, rows)))
    out = torch.empty_like(stream) if out is None else out
    return out.index_copy_(0, rows[:steered], rounded(h[:steered].to(stream.dtype)))


def _time_embedding(state: StepState, time_rows: torch.Tensor):
    """Euler step k -> the rows' time embeddings from the engine's table (time_table.py), if it has one."""
    table = state.times
    return None if table is None else (lambda k: table.at(time_rows, k))


def residual_stream(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The residual stream after layer L, as the next layer's fused add makes it from the layer's outputs."""
    return rounded((hidden.float() + residual.float()).to(hidden.dtype))


def steer_in_place(state: StepState, steer_into, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: torch.Tensor) -> bool:
    """The model's selects (`FlasSteer.forward`) done in the layer's own outputs, touching only the steered rows:
    run eagerly there is no graph to keep, and a 4096-token prefill step's full-size stream and selects cost
    more than the flow on a few steered rows. `steer_into(positions, stream, out)` writes the steered rows of
    `out` (here the residual). False: not this step (the flow would also run on unsteered tokens, whose
    results must not land, or the outputs alias): the model's way instead. Bits equal either way.
    """
    n = hidden.shape[0]
    if state.profiling:
        return False  # a dummy batch measures the peak of the model's way, which mixed steps may still take
    if not state.any_steered:
        return True  # nothing to replace
    state.plan_steered_rows()
    every = state.steered_rows == n == state.n_tokens
    if (state.rows is None and not every) or hidden.data_ptr() == residual.data_ptr():
        return False
    rows = None if every else state.rows[: state.steered_rows]
    pick = (lambda x: x) if every else (lambda x: x.index_select(0, rows))
    steered = residual_stream(pick(hidden), pick(residual))
    stream = steered if every else torch.empty_like(hidden).index_copy_(0, rows, steered)  # other rows unread
    steer_into(positions, stream, residual)
    if every:
        hidden.zero_()
    else:
        hidden.index_fill_(0, rows, 0)
    return True


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
