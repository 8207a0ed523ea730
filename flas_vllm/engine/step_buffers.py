"""Per-token steering data for one forward pass, in persistent device buffers.

The model's flow reads these buffers; a captured CUDA graph replays against
the same memory. Each step's values are built on the host and copied in
without a device sync: from pinned host staging, non-blocking, where the
device is a GPU.

A non-blocking copy reads its host source when the device gets to it, so that
source must not be rewritten until then. vLLM's V1 runner waits on its own
input-preparation event before the next step's preparation; its V2 runner has
no such event and instead rotates host buffers round-robin, as many as there
are batches in flight (`vllm/v1/worker/gpu/buffer_utils.py`). `set_staging_depth`
does the same here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class HostStaging:
    """One set of host tensors a step's values are written into before the copy to the device."""

    def __init__(self, max_tokens: int, flow_dtype, pin: bool):
        # device="cpu" explicitly: vLLM builds the model inside `with torch.device(<gpu>)`.
        host = dict(device="cpu", pin_memory=pin)
        self.steered = torch.zeros(max_tokens, dtype=torch.bool, **host)
        self.dt = torch.zeros(max_tokens, dtype=flow_dtype, **host)
        self.slot = torch.zeros(max_tokens, dtype=torch.long, **host)
        self.steps = torch.zeros(max_tokens, dtype=torch.int32, **host)
        self.order = torch.zeros(max_tokens, dtype=torch.long, **host)  # tokens grouped by concept length


class StepBuffers(nn.Module):
    """Per-token steering data, preallocated at max_num_batched_tokens and updated in place.

    `steps` is each token's own number of Euler steps (its request's n_steps).
    Tokens past the step's count (CUDA-graph padding) are unsteered, slot 0.
    """

    def __init__(self, max_tokens: int, flow_dtype, device):
        super().__init__()
        self.register_buffer("steered", torch.zeros(max_tokens, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("dt", torch.zeros(max_tokens, dtype=flow_dtype, device=device), persistent=False)
        self.register_buffer("slot", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("steps", torch.zeros(max_tokens, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("order", torch.zeros(max_tokens, dtype=torch.long, device=device), persistent=False)
        self._pin = device is not None and torch.device(device).type == "cuda"
        self._flow_dtype = flow_dtype
        self.max_tokens = max_tokens
        self.staging = [HostStaging(max_tokens, flow_dtype, self._pin)]
        self._next = 0
        self._current = self.staging[0]  # the set the latest publish wrote: stage_order adds to it

    def set_staging_depth(self, depth: int) -> None:
        """Rotate through `depth` host staging sets: one per step that may still be copying."""
        depth = max(1, int(depth))
        while len(self.staging) < depth:
            self.staging.append(HostStaging(self.max_tokens, self._flow_dtype, self._pin))
        del self.staging[depth:]
        self._next %= depth
        self._current = self.staging[(self._next - 1) % depth]

    def publish(self, steered: np.ndarray, dt: torch.Tensor, slot: np.ndarray, steps: np.ndarray) -> None:
        n = len(steered)
        if n > self.max_tokens:
            raise RuntimeError(f"step has {n} tokens, more than max_num_batched_tokens={self.max_tokens}")
        host = self._current = self.staging[self._next]
        self._next = (self._next + 1) % len(self.staging)
        host.steered[:n] = torch.from_numpy(steered)
        host.steered[n:] = False
        host.dt[:n] = dt
        host.slot[:n] = torch.from_numpy(slot)
        host.slot[n:] = 0
        host.steps[:n] = torch.from_numpy(steps)
        host.steps[n:] = 0
        self.steered.copy_(host.steered, non_blocking=True)
        self.dt.copy_(host.dt, non_blocking=True)
        self.slot.copy_(host.slot, non_blocking=True)
        self.steps.copy_(host.steps, non_blocking=True)

    def stage_order(self, order: np.ndarray) -> torch.Tensor:
        """The step's token order (grouped by concept length) on the device, copied like the rest."""
        n = len(order)
        host = self._current
        host.order[:n] = torch.from_numpy(order)
        self.order[:n].copy_(host.order[:n], non_blocking=True)
        return self.order[:n]
