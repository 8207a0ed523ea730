"""The flow's time embeddings, computed once per Euler step size rather than per token and Euler step.

The flow adds `time_embed(t_k)` (t_k = dt * k; a sinusoidal embedding, then Linear -> SiLU -> Linear) at
every block of every Euler step. It depends only on the request's step size and on k, so the original code
computes it once per sequence; computed per token, as a batch of mixed requests otherwise must, it is two
GEMMs and a dozen small ops per token and Euler step (~6% of the flow's FLOPs at Gemma-2-2B's width).

`TimeTable` holds, for each step size of a request in flight, its embeddings at every Euler step, in one
persistent device buffer a captured CUDA graph can read: row r, Euler step k. A request takes a reference
to its step size's row when it joins (`acquire`, filled by the flow's own `time_embed` the first time) and
drops it when it finishes; its row index travels per token like its concept slot (`RequestRow.time_row`).
Row 0 stays zero: unsteered tokens and dummy batches, whose flow results are never used. The table has a row
per request vLLM runs at once (`max_num_seqs`); preempted requests keep theirs, so the scheduler admits a
request with a new step size only while a row is free (patches/scheduler_admission.py), and the table never
evicts.
"""

from __future__ import annotations

import torch
from torch import nn

from flas_vllm.core.eager_numerics import rounded


def time_table_rows(scheduler_config) -> int:
    """The step sizes a worker's table holds at once (the scheduler admits no more)."""
    return int(scheduler_config.max_num_seqs)


class TimeTable(nn.Module):
    def __init__(self, capacity: int, max_n_steps: int, hidden: int, dtype: torch.dtype, device):
        super().__init__()
        self.capacity, self.max_n_steps = capacity, max_n_steps
        self.register_buffer("embeddings", torch.zeros(capacity + 1, max_n_steps, hidden, dtype=dtype, device=device),
                             persistent=False)
        self._rows: dict[float, list[int]] = {}  # step size -> [row, references]
        self._step_of: dict[int, float] = {}  # row -> its step size
        self._free = list(range(capacity, 0, -1))
        self.fills = 0  # rows computed (stats: one per step size a request brought in)

    def acquire(self, dt: float, flow) -> int:
        """The row of step size `dt` (a flow-dtype value), filled with `flow`'s embeddings if new; one reference."""
        entry = self._rows.get(dt)
        if entry is None:
            if not self._free:
                raise RuntimeError(f"FLAS time table: more than {self.capacity} step sizes in flight "
                                   f"(its capacity is max_num_seqs)")
            row = self._free[-1]
            self._fill(row, dt, flow)  # filled before anyone can find it
            entry = self._rows[dt] = [self._free.pop(), 0]
            self._step_of[row] = dt
        entry[1] += 1
        return entry[0]

    def release(self, row: int) -> None:
        dt = self._step_of.get(row)
        if dt is None:
            return
        entry = self._rows[dt]
        entry[1] -= 1
        if entry[1] == 0:
            del self._rows[dt], self._step_of[row]
            self._free.append(row)

    def refill(self, flow) -> None:
        """The flow's weights were (re)loaded: every live row again, in place (rows keep their indices)."""
        for dt, (row, _) in self._rows.items():
            self._fill(row, dt, flow)

    def rows_in_use(self) -> int:
        return len(self._rows)

    def _fill(self, row: int, dt: float, flow) -> None:
        emb = self.embeddings
        with torch.inference_mode():
            # t_k = dt * k: one float32 product rounded to the flow dtype, as integrate's `dt * k` with a Python k
            # (a float32 k: bf16 holds integers exactly only up to 256); torch.full: no host-to-device copy
            k = torch.arange(self.max_n_steps, dtype=torch.float32, device=emb.device)
            t = rounded((torch.full((), dt, dtype=torch.float32, device=emb.device) * k).to(emb.dtype))
            self.embeddings[row] = flow.time_embed(t)
        self.fills += 1

    def at(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """Euler step k's embedding for each token whose row index is in `rows` [...] -> [..., hidden]."""
        hidden = self.embeddings.shape[-1]
        return self.embeddings.select(1, k).index_select(0, rows.reshape(-1)).view(*rows.shape, hidden)
