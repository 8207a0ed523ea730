"""One engine step's steering, per token: built once per step from per-request rows, read by the flow.

A runner knows the step's requests in batch order; for each it produces one
`RequestRow` (made from the request's typed `Steering` by `request_row`):
the V1 runner's hook through `FlasRuntime.prepare_step`, Model Runner V2 through
`FlasModelState`, which keeps the rows in a `RowTable` by request index.
`build_step` turns the step's rows and its tokens per request into the
`StepState`: each row's fields repeated per token and staged in the persistent
device buffers (`StepBuffers`), the host-side facts the forward pass branches
on instead of syncing on device data, and the token order by concept length.
On the skip path (no CUDA graphs) it also stages the steered tokens' indices,
padded to a bucket (`rows`, `flow_row_bucket`): the flow computes only those rows
(flow_rows.py), and the concept-length groups are planned over them.
The flow, the slot table and the model read the state; nothing else is wired
between them.

Adding a per-request field: add it to `Steering` (core/steering.py), to
`RequestRow` and `ROW_DTYPES` and to `request_row` below; every row field is
repeated per token into a device buffer of the same name.

"Euler steps" (a request's flow integration steps, `euler_steps`) are not engine
steps (one forward pass of the batch, a `StepState`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from flas_vllm.core.flow import euler_dt
from flas_vllm.core.steering import Steering
from flas_vllm.engine.graph_buckets import graph_row_order
from flas_vllm.engine.step_buffers import FLOW_DTYPE, StepBuffers
from flas_vllm.engine.time_table import TimeTable


@dataclass(frozen=True)
class RequestRow:
    """One request's steering as the flow reads it; the default row is unsteered."""

    steered: bool = False
    slot: int = 0  # its concept's slot in the slot table (0: the null slot)
    euler_steps: int = 0  # the Euler steps its tokens take
    dt: float = 0.0  # the Euler step size, already rounded to the flow dtype
    time_row: int = 0  # its step size's row in the time-embedding table (time_table.py; 0: none)


# Each field's per-token dtype on the device (FLOW_DTYPE: the flow's; float64 on the host, exact).
ROW_DTYPES = {"steered": torch.bool, "slot": torch.long, "euler_steps": torch.int32, "dt": FLOW_DTYPE,
              "time_row": torch.long}
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(RequestRow))
assert set(ROW_DTYPES) == set(ROW_FIELDS), "every RequestRow field needs its per-token dtype"


@functools.lru_cache(maxsize=4096)
def _dt(flowtime: float, euler_steps: int, flow_dtype: torch.dtype) -> float:
    return float(euler_dt(flowtime, euler_steps, flow_dtype))  # a flow-dtype value: exact as a float


def request_row(steer: Steering | None, slot: int, default_euler_steps: int, flow_dtype: torch.dtype) -> RequestRow:
    """The row of a request with this steering, its concept in `slot`."""
    if steer is None:
        return RequestRow()
    n = steer.n_steps or default_euler_steps
    return RequestRow(steered=True, slot=slot, euler_steps=n, dt=_dt(steer.flowtime, n, flow_dtype))


def _host_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == FLOW_DTYPE else torch.empty(0, dtype=dtype).numpy().dtype


@dataclass
class StepRows:
    """The step's requests in batch order: one column per `RequestRow` field, and tokens per request."""

    columns: dict[str, np.ndarray]
    tokens: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[RequestRow], tokens: Sequence[int] | np.ndarray) -> "StepRows":
        columns = {name: np.array([getattr(r, name) for r in rows], dtype=_host_dtype(ROW_DTYPES[name]))
                   for name in ROW_FIELDS}
        return cls(columns, np.asarray(tokens, dtype=np.int64))

    def all_as(self, row: RequestRow) -> "StepRows":
        """The same tokens, every request given `row` (profiling and warm-up batches)."""
        return StepRows.of([row] * len(self.tokens), self.tokens)


class RowTable:
    """Rows by request index (Model Runner V2): set when a request is added, gathered each step."""

    def __init__(self, capacity: int):
        self.columns = {name: np.zeros(capacity, dtype=_host_dtype(ROW_DTYPES[name])) for name in ROW_FIELDS}

    def put(self, index: int, row: RequestRow) -> None:
        for name in ROW_FIELDS:
            self.columns[name][index] = getattr(row, name)

    def clear(self, index: int) -> None:
        self.put(index, RequestRow())

    def gather(self, indices: np.ndarray, live: np.ndarray, tokens: np.ndarray) -> StepRows:
        """The step's rows; a request that is not `live` (a dummy batch's made-up request) is unsteered."""
        empty = RequestRow()
        columns = {name: np.where(live, col[indices], getattr(empty, name)).astype(col.dtype, copy=False)
                   for name, col in self.columns.items()}
        return StepRows(columns, np.asarray(tokens, dtype=np.int64))


Groups = list[tuple[int, "torch.Tensor | None", torch.Tensor]]
LAZY_PLAN_STAGING_SETS = 2  # a step's lazily staged rows, and the next step's staging (StepState.plan_rows_lazily)
FLOW_ROW_BUCKET = 16  # the skip path pads its steered rows to a power of two up to this, then a multiple of it


@dataclass
class StepState:
    """This engine step's per-token steering: `buffers` holds each row field per token (a persistent device
    buffer of the field's name; the step's tokens are the first `n_tokens`)."""

    buffers: StepBuffers
    n_tokens: int = 0
    any_steered: bool = False  # host-side: is any scheduled token steered?
    max_euler_steps: int = 0  # host-side: the most Euler steps any steered token needs
    groups: Groups | None = None  # the flow's rows by bucketed concept length [(length, row index or None, slots)]
    profiling: bool = False  # a dummy batch (memory profiling, warm-up): every token steered
    steered_rows: int = 0  # host-side: the step's steered tokens
    flow_rows: int = 0  # host-side: the rows the flow computes (the skip path: steered, rounded up to a bucket)
    rows: torch.Tensor | None = None  # the flow's rows (token indices, `flow_rows` long); None: every token
    row_slots: torch.Tensor | None = None  # each of those rows' slot (the state's slots gathered by `rows`)
    request_tokens: np.ndarray | None = None  # host-side: each request's scheduled tokens, batch order
    steered_requests: np.ndarray | None = None  # host-side: the steered requests' batch indices (their tokens: `rows`)
    # with `rows`: the steered requests' indices and query_start_loc (int32) on the device, staged with the rows
    # while the step is prepared (steered_attention.py narrows the flow's attention metadata with them)
    steered_layout: tuple[torch.Tensor, torch.Tensor] | None = None
    graph_rows_wanted: bool = False  # stage the graph row order each step (FULL graphs keyed by steered bucket)
    # plan the skip path's rows and groups only when the eager op runs (bucketed FULL graphs replay without it)
    plan_lazily: bool = False
    pending_plan: Callable[[], None] | None = None
    times: TimeTable | None = None  # the engine's time embeddings per step size (None: computed per token)

    def slots(self, n: int) -> torch.Tensor:
        """The concept slot of each of the flow's `n` rows: its compacted rows' slots, or the first n tokens'."""
        return self.buffers.slot[:n] if self.rows is None else self.row_slots

    def plan_rows_lazily(self) -> None:
        """Leave the skip path's rows and groups to the eager op (bucketed FULL graphs replay without them).

        The op stages them during the forward pass, after vLLM V1's input-preparation event is recorded, so
        the next step must not rewrite that host memory until the device has read it. Each set waits for its
        own earlier copies (step_buffers.py); with LAZY_PLAN_STAGING_SETS sets in turn that wait is for a step
        already done, so the next step's preparation still overlaps this step's forward."""
        self.plan_lazily = True
        if len(self.buffers.staging) < LAZY_PLAN_STAGING_SETS:
            self.buffers.set_staging_sets(LAZY_PLAN_STAGING_SETS)

    def plan_steered_rows(self) -> None:
        """Plan the skip path's rows and groups now, if `build_step` left them for later (`plan_lazily`)."""
        plan, self.pending_plan = self.pending_plan, None
        if plan is not None:
            plan()

    @contextlib.contextmanager
    def flow_on_rows(self, rows: torch.Tensor | None, row_slots: torch.Tensor | None):
        """While a captured-graph flow runs on `rows` (None: every token): the table reads their slots,
        full length, no groups."""
        saved = self.rows, self.row_slots, self.groups
        self.rows, self.row_slots, self.groups = rows, row_slots, None
        try:
            yield
        finally:
            self.rows, self.row_slots, self.groups = saved

    @classmethod
    def allocate(cls, max_tokens: int, flow_dtype: torch.dtype, device) -> "StepState":
        """The engine's state: one persistent device buffer per row field, `max_tokens` long."""
        return cls(StepBuffers(max_tokens, flow_dtype, device, ROW_DTYPES))


def build_step(state: StepState, rows: StepRows, bucket_len: np.ndarray | None = None) -> StepState:
    """Rows (batch order) and tokens per request -> the step's per-token state, staged on the device.

    `bucket_len` (each slot's concept key length, bucketed; see SlotTableKV): given where the step may
    branch on data (the skip path), the flow runs only on the steered tokens (`rows`, padded to
    `flow_row_bucket`) and those rows are grouped by it; otherwise each token gathers the full length.
    """
    counts = rows.tokens
    state.buffers.publish({name: np.repeat(col, counts) for name, col in rows.columns.items()})
    steered = rows.columns["steered"] & (counts > 0)
    state.n_tokens = int(counts.sum())
    state.any_steered = bool(steered.any())
    state.max_euler_steps = int(rows.columns["euler_steps"][steered].max()) if state.any_steered else 0
    token_rows = np.flatnonzero(np.repeat(steered, counts))
    state.steered_rows = len(token_rows)
    state.request_tokens, state.steered_requests = counts, np.flatnonzero(steered)
    state.flow_rows = state.n_tokens if state.any_steered else 0
    state.groups = state.rows = state.row_slots = state.pending_plan = state.steered_layout = None
    if state.graph_rows_wanted:  # read by a FULL graph's flow, whichever bucket the step replays
        state.buffers.stage_graph_rows(graph_row_order(np.repeat(steered, counts)))
    if bucket_len is None or not state.any_steered:
        return state  # no flow work on the skip path: no groups either
    plan = functools.partial(_plan_steered_rows, state, bucket_len[np.repeat(rows.columns["slot"], counts)], token_rows)
    if state.plan_lazily:
        state.pending_plan = plan  # run by the eager op, if the step runs it (StepState.plan_steered_rows)
    else:
        plan()
    return state


def _plan_steered_rows(state: StepState, lengths: np.ndarray, token_rows: np.ndarray) -> None:
    """The skip path's rows (the steered tokens, padded to `flow_row_bucket`) and their concept-length groups."""
    slots = state.buffers.slot
    state.flow_rows = min(flow_row_bucket(state.steered_rows), state.n_tokens)
    if state.flow_rows < state.n_tokens:  # padding rows repeat the last steered token (results discarded)
        padded = np.concatenate([token_rows, np.full(state.flow_rows - len(token_rows), token_rows[-1])])
        state.rows = state.buffers.stage_rows(padded)
        state.steered_layout = state.buffers.stage_steered_requests(
            state.steered_requests, query_start(state.request_tokens[state.steered_requests]))
        slots = state.row_slots = state.buffers.slot.index_select(0, state.rows)
        lengths = lengths[padded]
    state.groups = plan_groups(lengths, slots, state.buffers.stage_order)


def query_start(query_lens: np.ndarray) -> np.ndarray:
    """Each request's first token in a step of these requests (vLLM's `query_start_loc`, one entry more)."""
    starts = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=starts[1:])
    return starts


def flow_row_bucket(steered: int) -> int:
    """The rows the flow computes for `steered` tokens: the next power of two up to FLOW_ROW_BUCKET,
    then the next multiple of it (at most FLOW_ROW_BUCKET - 1 rows of padding, at most 2x on tiny steps)."""
    if steered <= FLOW_ROW_BUCKET:
        return 1 << max(0, steered - 1).bit_length()
    return -(-steered // FLOW_ROW_BUCKET) * FLOW_ROW_BUCKET


def plan_groups(lengths: np.ndarray, device_slots: torch.Tensor, stage_order=None) -> Groups | None:
    """Tokens grouped by their concept's bucketed key length: [(length, token index or None, slots)].

    The token indices of all groups are one host array (tokens sorted by length) that `stage_order`
    copies to the device without a sync (pinned, non-blocking; see StepBuffers); each group is a slice.
    One length (or none): a single group over every token, no index.
    """
    found = np.unique(lengths)
    if len(found) == 0:
        return None  # no tokens: the table's full-length fallback
    if len(found) == 1:
        return [(int(found[0]), None, device_slots[: len(lengths)])]
    order = np.argsort(lengths, kind="stable")
    device_order = torch.from_numpy(order).to(device_slots.device) if stage_order is None else stage_order(order)
    bounds = np.searchsorted(lengths[order], found, side="right")
    groups, start = [], 0
    for length, end in zip(found, bounds):
        idx = device_order[start:end]
        groups.append((int(length), idx, device_slots.index_select(0, idx)))
        start = int(end)
    return groups
