"""Model Runner V2: steering through V2's per-model extension point, a model-state class.

V2 asks the model for its state class (`get_model_state_cls`) and calls it as
requests come and go and before every forward pass. Ours is vLLM's
`DefaultModelState` plus, as V2's LoRA handling does, one row of steering per
request index: set when the request is added (its concept encoded into a
slot then), gathered each step by the batch's `idx_mapping` and repeated by
each request's scheduled tokens. V2 drops preempted requests and adds them
again when they resume, so a concept evicted meanwhile is simply encoded
again. The per-token values reach the device through round-robin host
staging, one set per batch in flight (`StepBuffers.set_staging_sets`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from flas_vllm.engine.step_state import RowTable


REMEMBERED_REMOVALS = 1 << 16  # ids of removed requests kept to tell a resumed request from a new one


class FlasModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.runtime = model.flas_runtime
        self.runtime.model_runner = "v2"
        self.runtime.state.buffers.set_staging_sets(max(2, int(vllm_config.max_concurrent_batches)))
        n = self.max_num_reqs
        self.rows = RowTable(n)  # each request index's steering row (step_state.RequestRow)
        self.owner = np.full(n, None, dtype=object)  # req_id per row: dummy batches match no row
        self.row_of: dict[str, int] = {}
        self.removed: OrderedDict[str, None] = OrderedDict()  # V2 removes preempted requests too

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        super().add_request(req_index, new_req_data)
        rid = new_req_data.req_id
        params = new_req_data.sampling_params
        resumed = self.removed.pop(rid, False) is None  # a preempted request, back: not a new steered request
        self.rows.put(req_index, self.runtime.admit(rid, getattr(params, "extra_args", None), resumed=resumed).row)
        self.owner[req_index] = rid
        self.row_of[rid] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.runtime.finish(req_id)
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.owner[row] = None
            self.rows.clear(row)
            self.removed[req_id] = None
            if len(self.removed) > REMEMBERED_REMOVALS:
                self.removed.popitem(last=False)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        n = input_batch.num_reqs
        rows = input_batch.idx_mapping_np[:n]
        # a dummy batch has made-up req_ids: no live request's row is used (within vLLM's dummy runs the
        # runtime steers all of it, see FlasRuntime.profiling)
        live = self.owner[rows] == np.asarray(input_batch.req_ids[:n], dtype=object)
        counts = np.diff(input_batch.query_start_loc_np[: n + 1])
        self.runtime.publish(self.rows.gather(rows, live, counts))
        return inputs
