"""Per-token steering data for one forward pass, in persistent device buffers.

The model's flow reads these buffers; a captured CUDA graph replays against
the same memory. Each step's values are built on the host and copied in
without a device sync: from pinned host staging, non-blocking, where the
device is a GPU.

A non-blocking copy reads its host source when the device gets to it, so that
source must not be rewritten until then. vLLM's V1 runner waits on its own
input-preparation event before the next step's preparation; its V2 runner has
no such event and instead rotates host buffers round-robin, as many as there
are batches in flight (`vllm/v1/worker/gpu/buffer_utils.py`). `set_staging_sets`
does the same here.

Those runner events do not cover everything: a dummy batch (a data-parallel rank with
no requests runs one each step; warm-up) publishes with no event before it, and a
bucketed engine's rows are staged by the op during the forward pass, after V1's event.
So each set records a CUDA event after its copies, and a step that starts writing a
set first waits on the host for that set's last copy from an earlier step. In the
runners' normal course that copy is long done; a bucketed engine keeps it so with two
sets in turn (`StepState.plan_rows_lazily`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

FLOW_DTYPE = "flow"  # a column held in the flow's dtype


def _dtype(dtype, flow_dtype):
    return flow_dtype if dtype == FLOW_DTYPE else dtype


class HostStaging:
    """One set of host tensors a step's values are written into before the copy to the device."""

    def __init__(self, columns: Mapping[str, object], max_tokens: int, flow_dtype, pin: bool):
        # device="cpu" explicitly: vLLM builds the model inside `with torch.device(<gpu>)`.
        self.columns = {name: torch.zeros(max_tokens, dtype=_dtype(dtype, flow_dtype), device="cpu", pin_memory=pin)
                        for name, dtype in columns.items()}
        self.order = torch.zeros(max_tokens, dtype=torch.long, device="cpu", pin_memory=pin)  # tokens by length
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device="cpu", pin_memory=pin)  # the flow's rows
        # the graph row order (steered tokens first): identity where a step does not write it
        self.graph_rows = torch.zeros(max_tokens, dtype=torch.long, device="cpu", pin_memory=pin)
        # the steered requests' batch indices and their query_start_loc (steered_attention.py)
        self.requests = torch.zeros(max_tokens + 1, dtype=torch.long, device="cpu", pin_memory=pin)
        self.query_start = torch.zeros(max_tokens + 1, dtype=torch.int32, device="cpu", pin_memory=pin)
        self.copied = None  # an event recorded after the latest device copy from this set (CUDA only)

    def copies_enqueued(self, make_event) -> None:
        """Mark the copies issued so far from this set (re-recorded after each, so it covers the latest)."""
        if make_event is None or _capturing():
            return
        if self.copied is None:
            self.copied = make_event()
        self.copied.record()

    def wait_for_copies(self) -> None:
        """Block the host until the device has read this set's earlier copies: it may be rewritten after."""
        if self.copied is not None and not _capturing():
            self.copied.synchronize()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class StepBuffers(nn.Module):
    """Per-token steering data, preallocated at max_num_batched_tokens and updated in place.

    `columns`: name -> dtype (or FLOW_DTYPE) of each per-token buffer; the engine's are the fields of
    a request's row (step_state.ROW_DTYPES), each repeated per token. Tokens past the step's count
    (CUDA-graph padding) get zeros: unsteered, slot 0. `order` holds the token order by concept length,
    `rows` the tokens the flow computes when it runs on the steered tokens only (step_state.build_step),
    `graph_rows` every token with the steered ones first, a permutation of all `max_tokens` rows at all
    times (graph_buckets.py: a FULL graph's flow reads its first b entries), `requests` and `query_start`
    the steered requests' indices and query offsets (steered_attention.py).
    """

    def __init__(self, max_tokens: int, flow_dtype, device, columns: Mapping[str, object] | None = None):
        super().__init__()
        self.columns = dict(columns or {})
        for name, dtype in self.columns.items():
            self.register_buffer(name, torch.zeros(max_tokens, dtype=_dtype(dtype, flow_dtype), device=device),
                                 persistent=False)
        self.register_buffer("order", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("rows", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("graph_rows", torch.arange(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("requests", torch.zeros(max_tokens + 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("query_start", torch.zeros(max_tokens + 1, dtype=torch.int32, device=device),
                             persistent=False)
        self._graph_rows_high = 0  # graph_rows past this are the identity
        self._pin = device is not None and torch.device(device).type == "cuda"
        self.make_event = torch.cuda.Event if self._pin else None  # CPU copies are done when issued
        self._flow_dtype = flow_dtype
        self.max_tokens = max_tokens
        self.staging = [self._staging_set()]
        self._next = 0
        self._current = self.staging[0]  # the set the latest publish wrote: stage_order adds to it

    def _staging_set(self) -> HostStaging:
        return HostStaging(self.columns, self.max_tokens, self._flow_dtype, self._pin)

    def set_staging_sets(self, count: int) -> None:
        """Rotate through `count` host staging sets: one per engine step that may still be copying."""
        count = max(1, int(count))
        while len(self.staging) < count:
            self.staging.append(self._staging_set())
        del self.staging[count:]
        self._next %= count
        self._current = self.staging[(self._next - 1) % count]

    def publish(self, values: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """One host array (or tensor) per column, all of the step's token count."""
        n = len(next(iter(values.values())))
        if n > self.max_tokens:
            raise RuntimeError(f"step has {n} tokens, more than max_num_batched_tokens={self.max_tokens}")
        host = self._current = self.staging[self._next]
        self._next = (self._next + 1) % len(self.staging)
        host.wait_for_copies()  # an earlier step's copies from this set (a dummy batch's publish waits on nothing else)
        for name in self.columns:
            value = values[name]
            staged = host.columns[name]
            staged[:n] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            staged[n:] = 0
            getattr(self, name).copy_(staged, non_blocking=True)
        host.copies_enqueued(self.make_event)

    def stage_order(self, order: np.ndarray) -> torch.Tensor:
        """The step's token order (grouped by concept length) on the device, copied like the rest."""
        return self._stage("order", order)

    def stage_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The token indices the flow computes this step (its steered tokens, padded) on the device."""
        return self._stage("rows", rows)

    def stage_steered_requests(self, requests: np.ndarray, query_start: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The steered requests' batch indices and their `query_start_loc` (int32) on the device, for attention
        metadata narrowed to them (steered_attention.py)."""
        return self._stage("requests", requests), self._stage("query_start", query_start)

    def stage_graph_rows(self, order: np.ndarray) -> None:
        """The step's graph row order (a permutation of its tokens); the positions after it are the identity,
        so any prefix of the buffer holds distinct rows, CUDA-graph padding included."""
        n = len(order)
        high = max(n, self._graph_rows_high)
        staged = self._current.graph_rows
        staged[:n] = torch.from_numpy(order)
        staged[n:high] = torch.arange(n, high)
        self.graph_rows[:high].copy_(staged[:high], non_blocking=True)
        self._current.copies_enqueued(self.make_event)
        self._graph_rows_high = n

    def _stage(self, name: str, values: np.ndarray) -> torch.Tensor:
        n = len(values)
        staged, buffer = getattr(self._current, name), getattr(self, name)
        staged[:n] = torch.from_numpy(values)
        buffer[:n].copy_(staged[:n], non_blocking=True)
        self._current.copies_enqueued(self.make_event)
        return buffer[:n]
