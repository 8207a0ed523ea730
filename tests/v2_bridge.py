"""Drive the Model Runner V2 model state from a running V1 engine, for tests on CPU.

V2 itself needs Triton, which vLLM's CPU build lacks, so no V2 engine can run
here. Everything FLAS adds to V2 is its model-state class, though, and that
class only sees V2's own objects: `NewRequestData` when a request is added,
its id when it is removed, an `InputBatch` before each forward pass. This
bridge makes those objects from each step of a real V1 engine (request rows in
a scrambled order, as V2's free list hands them out; a request missing from a
step is removed and added again when it returns, as V2 does on preemption)
and lets `FlasModelState` publish the step's steering instead of the V1 hook.
The engine's outputs then show whether the V2 state steers as V1 does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from flas_vllm.engine.worker_ext import FlasWorkerExtension


class V2Bridge:
    def __init__(self, worker: Any, seed: int = 0):
        from vllm.v1.worker.gpu.input_batch import InputBuffers

        from flas_vllm.engine.model_state import FlasModelState

        runner = worker.model_runner
        self.model = runner.get_model()
        config = worker.vllm_config
        self.state = FlasModelState(config, self.model, None, runner.device)
        self.buffers = InputBuffers(self.state.max_num_reqs, self.state.max_num_tokens, runner.device)
        self.free = [int(i) for i in np.random.default_rng(seed).permutation(self.state.max_num_reqs)]
        self.row: dict[str, int] = {}
        self.seen: set[str] = set()
        self.counts = {"added": 0, "readded": 0, "removed": 0, "steps": 0, "dummy_steps": 0, "rows": []}
        self.model.flas_prepare_step = self.prepare_step  # shadows the V1 path on this model instance
        self.model.flas_request_finished = self.remove

    def uninstall(self) -> None:
        for rid in list(self.row):
            self.remove(rid)
        del self.model.flas_prepare_step, self.model.flas_request_finished
        self.model.flas_runtime.state.buffers.set_staging_sets(1)
        self.model.flas_runtime.model_runner = "v1"

    # -- what V2's runner calls --------------------------------------------------

    def add(self, rid: str, request: Any) -> None:
        from vllm.v1.core.sched.output import NewRequestData

        index = self.free.pop()
        prefill = list(request.prompt_token_ids) + list(request.output_token_ids)
        data = NewRequestData(
            req_id=rid, prompt_token_ids=request.prompt_token_ids, mm_features=[],
            sampling_params=request.sampling_params, pooling_params=None, block_ids=request.block_ids,
            num_computed_tokens=request.num_computed_tokens, lora_request=None, prefill_token_ids=prefill,
        )
        self.state.add_request(index, data)
        self.row[rid] = index
        self.counts["readded" if rid in self.seen else "added"] += 1
        self.seen.add(rid)
        self.counts["rows"].append(index)  # in the order requests were added

    def remove(self, rid: str) -> None:
        if rid in self.row:
            self.state.remove_request(rid)
            self.free.append(self.row.pop(rid))
            self.counts["removed"] += 1

    def prepare_step(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray,
                     requests: Mapping[str, Any]) -> None:
        req_ids = list(req_ids)
        for rid in [r for r in self.row if r not in req_ids]:
            self.remove(rid)  # not in this step: V2 would have dropped it if preempted
        for rid in req_ids:
            if rid not in self.row:
                self.add(rid, requests[rid])
        counts = np.asarray(num_scheduled_tokens[: len(req_ids)], dtype=np.int32)
        self.state.prepare_inputs(self.batch(req_ids, counts), None)
        self.counts["steps"] += 1

    def batch(self, req_ids: list[str], counts: np.ndarray):
        """A V2 `InputBatch`, made by V2's own constructor, carrying this step's request -> row mapping."""
        from vllm.v1.worker.gpu.input_batch import InputBatch

        n, total = len(req_ids), int(counts.sum())
        base = InputBatch.make_dummy(n, total, self.buffers)
        rows = np.array([self.row[r] for r in req_ids], dtype=np.intp)
        query_start = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start[1:])
        return dataclasses.replace(
            base, req_ids=req_ids, idx_mapping_np=rows, idx_mapping=torch.from_numpy(rows.astype(np.int64)),
            num_scheduled_tokens=counts, query_start_loc_np=query_start,
        )

    def dummy_step(self, concept: str, num_reqs: int, num_tokens: int) -> dict:
        """A V2 dummy batch (profiling, warm-up, CUDA-graph capture) over rows that live steered requests own.

        The dummy batch names rows 0..num_reqs-1 under made-up request ids; the same rows under their
        owners' ids must steer. Returns what each of the two steps published.
        """
        from vllm import SamplingParams
        from vllm.v1.core.sched.output import NewRequestData
        from vllm.v1.worker.gpu.input_batch import InputBatch

        from flas_vllm.core.steering import WIRE_KEY, Steering

        runtime = self.model.flas_runtime
        form = Steering(concept=concept, flowtime=1.0, n_steps=runtime.n_steps).to_wire()
        ids = [f"flas-bridge-live-{i}" for i in range(num_reqs)]
        for row, rid in enumerate(ids):
            self.free.remove(row)
            self.state.add_request(row, NewRequestData(
                req_id=rid, prompt_token_ids=[2, 3, 4], mm_features=[],
                sampling_params=SamplingParams(max_tokens=1, extra_args={WIRE_KEY: form}),
                pooling_params=None, block_ids=([],), num_computed_tokens=0, lora_request=None,
                prefill_token_ids=[2, 3, 4]))
            self.row[rid] = row
        published = {}
        dummy = InputBatch.make_dummy(num_reqs, num_tokens, self.buffers)
        real = self.batch(ids, np.asarray(dummy.num_scheduled_tokens, dtype=np.int32))
        for name, batch in (("dummy", dummy), ("live", real)):
            self.state.prepare_inputs(batch, None)
            published[name] = {"any_steered": runtime.state.any_steered,
                               "steered_tokens": int(runtime.state.buffers.steered.sum()),
                               "rows": [int(r) for r in batch.idx_mapping_np]}
        for rid in ids:
            self.remove(rid)
        self.counts["dummy_steps"] += 1
        return published


class V2BridgeWorkerExtension(FlasWorkerExtension):
    """`worker_extension_cls` for test engines whose FLAS steering is published by the V2 model state."""

    _bridge: V2Bridge | None = None

    def flas_test_v2_install(self, seed: int = 0) -> bool:
        if self._bridge is None:
            self._bridge = V2Bridge(self, seed)
        return True

    def flas_test_v2_uninstall(self) -> bool:
        if self._bridge is not None:
            self._bridge.uninstall()
            self._bridge = None
        return True

    def flas_test_v2_counts(self) -> dict:
        counts = dict(self._bridge.counts)
        counts["staging_depth"] = len(self._bridge.model.flas_runtime.state.buffers.staging)
        return counts

    def flas_test_v2_dummy_step(self, concept: str, num_reqs: int, num_tokens: int) -> dict:
        return self._bridge.dummy_step(concept, num_reqs, num_tokens)
