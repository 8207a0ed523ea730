"""The per-step buffers the model allocates at construction: where they live, under vLLM's device context."""

from __future__ import annotations

import torch

from flas_vllm.engine.runtime import SlotTableKV, StepBuffers
from tests.test_slot_table import G


def test_host_staging_stays_on_the_cpu_inside_a_device_context():
    """vLLM builds the model under `with torch.device(<gpu>)`: staging must not follow it (pinning would raise)."""
    with torch.device("meta"):
        buffers = StepBuffers(16, torch.bfloat16, torch.device("meta"))
        table = SlotTableKV(G, num_blocks=2, capacity=4, max_len=64, dtype=torch.bfloat16, device="meta")
    for name in ("_host_steered", "_host_dt", "_host_slot"):
        assert getattr(buffers, name).device.type == "cpu", name
    for name in ("steered", "dt", "slot"):
        assert getattr(buffers, name).device.type == "meta", name  # device buffers do follow the model
    assert table.keys.device.type == "meta" and table.valid.device.type == "meta"

