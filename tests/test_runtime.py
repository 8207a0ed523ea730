"""The V1 runner's per-step bookkeeping (`FlasRuntime.prepare_step`), without an engine.

A request's row is made once, when it joins: every later step reads it (a step of 256 decodes used to
rebuild 256 rows, half of the runtime's host time per step). What must still hold: the published state
follows each request's own steering; a request whose concept left the table meanwhile is encoded again
(into a fresh slot) before it runs, its row following the slot; a finished request releases its slot.
Encoding itself is the engine tests' subject: here it only records which concept went into which slot.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.flow import euler_dt
from flas_vllm.core.steering import WIRE_KEY, parse_steering, steering
from flas_vllm.engine.runtime import FlasRuntime
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import StepState
from tests.test_slot_table import G


def _runtime(tokenizer: str = "tokenizer") -> tuple[FlasRuntime, list]:
    state = StepState.allocate(64, torch.float32, "cpu")
    table = SlotTableKV(G, num_blocks=1, capacity=4, max_len=16, dtype=torch.float32, device="cpu", state=state)
    runtime = FlasRuntime(None, FlasEngineOptions(checkpoint="c", max_concepts=2), SimpleNamespace(dtype=torch.float32),
                          (3, 4), 16, table, state, tokenizer, {})
    encoded = []
    runtime._encode_into = lambda slot, concept: encoded.append((concept, slot))  # the encoder: not this test's
    return runtime, encoded


def _request(concept: str | None, flowtime: float = 0.5, n_steps: int | None = None):
    extra = None
    if concept is not None:  # what the front end attaches (patches/admission.py)
        extra = {WIRE_KEY: parse_steering(steering(concept, flowtime, n_steps)).to_wire()}
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def _columns(runtime: FlasRuntime) -> dict[str, np.ndarray]:
    n = runtime.state.n_tokens
    buffers = runtime.state.buffers
    return {name: getattr(buffers, name)[:n].numpy() for name in buffers.columns}


def test_each_step_publishes_each_request_s_own_steering_from_rows_made_once():
    runtime, encoded = _runtime()
    made = []
    row = runtime.row
    runtime.row = lambda steer, slot: made.append(slot) or row(steer, slot)
    requests = {"a": _request("pirates", 0.5), "u": _request(None), "b": _request("cats", 1.0, n_steps=4)}
    runtime.prepare_step(["a", "u", "b"], np.array([3, 1, 2]), requests)
    (_, slot_a), (_, slot_b) = encoded
    cols = _columns(runtime)
    assert cols["steered"].tolist() == [True] * 3 + [False] + [True] * 2
    assert cols["slot"].tolist() == [slot_a] * 3 + [0] + [slot_b] * 2
    assert cols["euler_steps"].tolist() == [3] * 3 + [0] + [4] * 2  # the engine's default 3; b asked for 4
    dt = [float(euler_dt(t, n, torch.float32)) for t, n in ((0.5, 3), (1.0, 4))]
    assert cols["dt"].tolist() == [dt[0]] * 3 + [0.0] + [dt[1]] * 2
    for _ in range(3):  # decode steps, another batch order
        runtime.prepare_step(["b", "a", "u"], np.array([1, 1, 1]), requests)
        assert _columns(runtime)["slot"].tolist() == [slot_b, slot_a, 0]
    assert len(made) == 3, "a request's row is made when it joins, not on every step"


def test_a_request_whose_concept_left_the_table_is_encoded_again_before_it_runs():
    runtime, encoded = _runtime()
    requests = {"a": _request("pirates")}
    runtime.prepare_step(["a"], np.array([2]), requests)
    old = encoded[-1][1]
    # its concept's slot is taken from under it (as a preemption that released it would leave it) ...
    runtime.slots.release(old)
    assert runtime.slots.evict("pirates")
    runtime.slots.acquire("cats")  # ... and reused by another concept
    runtime.prepare_step(["a"], np.array([1]), requests)
    concept, slot = encoded[-1]
    assert concept == "pirates" and slot != old and runtime.slots.slot_of("pirates") == slot
    assert _columns(runtime)["slot"].tolist() == [slot], "the row follows the concept to its new slot"


def test_a_finished_request_releases_its_concept():
    runtime, encoded = _runtime()
    requests = {"a": _request("pirates"), "b": _request("pirates")}
    runtime.prepare_step(["a", "b"], np.array([1, 1]), requests)
    assert len(encoded) == 1 and runtime.slots.entries()[0]["refs"] == 2  # one concept, encoded once
    runtime.finish("a")
    del requests["a"]
    runtime.prepare_step(["b"], np.array([1]), requests)
    assert runtime.slots.entries()[0]["refs"] == 1
    runtime.prepare_step([], np.array([], dtype=np.int64), {})  # b left the runner without its hook
    assert runtime.slots.entries()[0]["refs"] == 0 and runtime.evict(["pirates"]) == [True]


def test_the_concept_tokenizer_loads_with_the_weights_not_in_the_first_steered_step(tiny_model):
    runtime, _ = _runtime(str(tiny_model))
    assert not runtime.stats()["tokenizer_loaded"]
    runtime.weights_loaded()  # what the model's load_weights calls once the weights are in
    assert runtime.stats()["tokenizer_loaded"]
    assert runtime.tokenizer("pirates")["input_ids"]


def test_a_tokenizer_that_cannot_load_is_logged_at_load_and_raised_by_the_first_concept(tmp_path, caplog):
    missing = str(tmp_path / "no-tokenizer-here")
    runtime, _ = _runtime(missing)
    with caplog.at_level(logging.WARNING, logger="flas_vllm.engine.runtime"):
        runtime.weights_loaded()  # an engine that may serve unsteered traffic only still starts
    assert not runtime.stats()["tokenizer_loaded"]
    assert any(missing in r.getMessage() and "steered requests will fail" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="no-tokenizer-here"):
        runtime.tokenizer


def test_requests_hold_their_step_size_s_time_embeddings_while_in_flight(tiny_model):
    """Each steered request's row points at its step size's time embeddings (engine/time_table.py): shared by
    requests of one step size, kept when its concept is encoded again, released when it finishes, and filled
    again in place when the weights are reloaded."""
    from flas_vllm.core.flow import TimeEmbedding  # the table's embedder: only this test builds one
    from flas_vllm.engine.time_table import TimeTable

    runtime, _ = _runtime(str(tiny_model))  # a tokenizer that loads with the weights (no hub lookup)
    torch.manual_seed(0)
    runtime.flow = SimpleNamespace(dtype=torch.float32, time_embed=TimeEmbedding(16).eval())
    times = runtime.state.times = TimeTable(4, 4, 16, torch.float32, "cpu")
    requests = {"a": _request("pirates", 0.5), "b": _request("cats", 0.5), "c": _request("cats", 2.0),
                "u": _request(None)}
    runtime.prepare_step(["a", "b", "c", "u"], np.array([2, 1, 1, 1]), requests)
    rows = _columns(runtime)["time_row"].tolist()
    assert rows[0] == rows[1] == rows[2] != rows[3] != 0 and rows[4] == 0  # a and b share dt = 0.5 / 3
    assert times.rows_in_use() == 2
    runtime.slots.release(runtime.slots.slot_of("pirates"))  # a's concept leaves the table under it ...
    assert runtime.slots.evict("pirates")
    runtime.prepare_step(["a"], np.array([1]), requests)  # ... and is encoded again: same row
    assert _columns(runtime)["time_row"].tolist() == [rows[0]] and times.rows_in_use() == 2
    before = times.embeddings[rows[3]].clone()
    with torch.no_grad():
        runtime.flow.time_embed.mlp[2].bias.add_(1.0)  # a weight reload ...
    runtime.weights_loaded()
    runtime.prepare_step(["c"], np.array([1]), requests)  # ... refills the live rows, in place, before the step
    assert _columns(runtime)["time_row"].tolist() == [rows[3]]
    torch.testing.assert_close(times.embeddings[rows[3]], before + 1.0)
    runtime.prepare_step([], np.array([], dtype=np.int64), {})
    assert times.rows_in_use() == 0  # every request left: each released its row
