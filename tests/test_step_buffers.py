"""The per-step buffers the model allocates at construction: where they live, under vLLM's device context."""

from __future__ import annotations

import torch

from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_buffers import StepBuffers
from flas_vllm.engine.step_state import ROW_DTYPES
from tests.test_slot_table import G


def test_host_staging_stays_on_the_cpu_inside_a_device_context():
    """vLLM builds the model under `with torch.device(<gpu>)`: staging must not follow it (pinning would raise)."""
    with torch.device("meta"):
        buffers = StepBuffers(16, torch.bfloat16, torch.device("meta"), ROW_DTYPES)
        buffers.set_staging_sets(3)  # Model Runner V2's round-robin staging, also built under the context
        table = SlotTableKV(G, num_blocks=2, capacity=4, max_len=64, dtype=torch.bfloat16, device="meta")
    assert len(buffers.staging) == 3
    for host in buffers.staging:
        for name in ("steered", "dt", "slot", "euler_steps"):
            assert host.columns[name].device.type == "cpu", name
    for name in ("steered", "dt", "slot"):
        assert getattr(buffers, name).device.type == "meta", name  # device buffers do follow the model
    assert table.keys.device.type == "meta" and table.valid.device.type == "meta"


def test_model_runner_v2_staging_rotates_so_a_pending_copy_keeps_its_source():
    """V2 has no input-preparation event: each step in flight gets its own host staging set."""
    import numpy as np

    buffers = StepBuffers(8, torch.float32, "cpu", ROW_DTYPES)
    buffers.set_staging_sets(2)

    def step(slot_value: int):
        n = 5
        buffers.publish({"steered": np.ones(n, dtype=bool), "dt": torch.full((n,), 0.25),
                         "slot": np.full(n, slot_value, dtype=np.int64), "euler_steps": np.full(n, 3, dtype=np.int32),
                         "time_row": np.full(n, 1, dtype=np.int64)})
        buffers.stage_order(np.arange(n)[::-1].copy())

    step(1)
    step(2)
    first, second = buffers.staging
    assert first.columns["slot"][:5].tolist() == [1] * 5 and second.columns["slot"][:5].tolist() == [2] * 5  # step 1's source intact
    assert first.order[:5].tolist() == second.order[:5].tolist() == [4, 3, 2, 1, 0]  # order joins its own set
    assert buffers.slot[:5].tolist() == [2] * 5 and buffers.slot[5:].tolist() == [0] * 3
    assert buffers.steered.tolist() == [True] * 5 + [False] * 3  # padding tokens are unsteered
    step(3)
    assert first.columns["slot"][:5].tolist() == [3] * 5 and second.columns["slot"][:5].tolist() == [2] * 5  # round robin


class _Event:
    """Stands in for torch.cuda.Event: logs records and host waits (with what the staged slots held then)."""

    def __init__(self, log, host):
        self.log, self.host = log, host

    def record(self):
        self.log.append(("record", self.host.columns["slot"][0].item()))

    def synchronize(self):
        self.log.append(("wait", self.host.columns["slot"][0].item()))


def test_a_step_rewrites_a_staging_set_only_after_its_earlier_copies_have_run():
    """A dummy batch (a data-parallel rank without requests, warm-up) publishes without any runner event before
    it: the set's own event, recorded after its copies, is waited on before the set is written again. The
    step's own later copies (its token order, rows) record without waiting (the host never waits on the step it
    is preparing). CPU copies are done when issued: no events there (`make_event` is None); here a stand-in."""
    import numpy as np

    buffers = StepBuffers(8, torch.float32, "cpu", ROW_DTYPES)
    assert buffers.make_event is None
    log = []
    host = buffers.staging[0]
    buffers.make_event = lambda: _Event(log, host)

    def publish(slot_value: int):
        n = 3
        buffers.publish({"steered": np.ones(n, dtype=bool), "dt": torch.full((n,), 0.5),
                         "slot": np.full(n, slot_value, dtype=np.int64), "euler_steps": np.full(n, 2, dtype=np.int32),
                         "time_row": np.full(n, 1, dtype=np.int64)})

    publish(7)
    buffers.stage_order(np.arange(3))
    buffers.stage_rows(np.arange(3))
    assert log == [("record", 7)] * 3  # nothing to wait for yet; each copy re-records the set's event
    log.clear()
    publish(9)  # the next step (or a dummy batch) on the same set
    assert log == [("wait", 7), ("record", 9)]  # waited while the set still held step 7's values
