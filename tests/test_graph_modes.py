"""Where the flow runs in each compile / CUDA-graph mode (engine/graph_modes.py).

CPU cannot capture CUDA graphs, so what is tested here is what decides it: the front end's
change to vLLM's compilation config, the worker's choice of path, and vLLM's own `split_graph`
cutting the model's graph at the flow's op, with the op's output buffer allocated in the piece
before it (a captured piece's buffer: the next piece reads it where it was captured).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx

from vllm.compilation.backends import split_graph
from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

from flas_vllm.engine.graph_modes import (STEER_OP, captured_flow_rows, captures_no_graphs, flow_runs_as_op,
                                         op_runs_between_pieces, split_piecewise_graphs_at_the_flow)
from flas_vllm.engine.model import register_steer_op

ATTENTION = "vllm::unified_attention_with_output"


def _config(mode: CUDAGraphMode, compile_mode=CompilationMode.VLLM_COMPILE, splitting_ops=None):
    cc = CompilationConfig(mode=compile_mode, cudagraph_mode=mode, splitting_ops=splitting_ops)
    cc.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")  # as VllmConfig resolves it
    return cc


def test_piecewise_graphs_are_cut_at_the_flow():
    cc = _config(CUDAGraphMode.PIECEWISE)
    defaults = list(cc.splitting_ops)
    assert ATTENTION in defaults and STEER_OP not in defaults
    assert split_piecewise_graphs_at_the_flow(cc)
    assert cc.splitting_ops == defaults + [STEER_OP]  # vLLM's own splits kept, the flow's added
    assert split_piecewise_graphs_at_the_flow(cc) and cc.splitting_ops.count(STEER_OP) == 1  # idempotent
    assert flow_runs_as_op(cc, graph_path=False)
    assert not flow_runs_as_op(cc, graph_path=True)  # forced: the flow in the graph on every token
    forced = _config(CUDAGraphMode.PIECEWISE)
    assert not split_piecewise_graphs_at_the_flow(forced, graph_path=True) and STEER_OP not in forced.splitting_ops


def test_graphs_without_vllms_compile_never_run_the_op():
    """Breakable CUDA graphs (no compile, captured around marked ops only) would capture an op named in
    the splitting list like any other: only vLLM's compiled, split graph runs it between pieces."""
    cc = _config(CUDAGraphMode.PIECEWISE, CompilationMode.NONE, splitting_ops=[ATTENTION, STEER_OP])
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert not split_piecewise_graphs_at_the_flow(cc)
    assert not flow_runs_as_op(cc, graph_path=False)


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL,
                                  CUDAGraphMode.FULL_DECODE_ONLY])
def test_full_graphs_keep_the_flow_in_the_graph(mode):
    """A FULL graph would replay the capture step's flow work: the op must not be used there."""
    cc = _config(mode)
    before = list(cc.splitting_ops or [])
    assert not split_piecewise_graphs_at_the_flow(cc)
    assert list(cc.splitting_ops or []) == before
    assert not flow_runs_as_op(cc, graph_path=False)


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE])
def test_bucketed_full_graphs_run_the_op_everywhere_and_between_pieces_where_there_are_pieces(mode):
    """flow_graphs="bucketed": the op in every mode; FULL_AND_PIECEWISE's pieces are cut around it too, so its
    PIECEWISE steps (prefill) run it eagerly on their steered tokens (FULL steps replay a bucket's graph)."""
    cc = _config(mode)
    assert split_piecewise_graphs_at_the_flow(cc, flow_graphs="bucketed") and STEER_OP in cc.splitting_ops
    assert flow_runs_as_op(cc, graph_path=False, flow_graphs="bucketed")
    assert op_runs_between_pieces(cc, "bucketed")
    assert not op_runs_between_pieces(cc, "traced") or mode == CUDAGraphMode.PIECEWISE
    full = _config(CUDAGraphMode.FULL)  # one graph, no pieces: the op is captured inside it
    assert not split_piecewise_graphs_at_the_flow(full, flow_graphs="bucketed")
    assert flow_runs_as_op(full, graph_path=False, flow_graphs="bucketed") and not op_runs_between_pieces(full, "bucketed")
    forced = _config(mode)  # graph_path with bucketed: the op too (its graph-safe rows on every step)
    assert flow_runs_as_op(forced, graph_path=True, flow_graphs="bucketed")


def test_the_op_runs_graph_safe_on_the_captured_rows_whenever_a_graph_records_it():
    """Which rows the op computes when a graph records it (None: eager, it may look at the step)."""
    from types import SimpleNamespace

    keyed = SimpleNamespace(num_tokens=16, flow_rows=4)  # V1's FULL descriptor with its bucket
    rows = dict(op_split=True, capturing=False, capture_rows=None)
    assert captured_flow_rows(CUDAGraphMode.FULL, keyed, 16, **rows) == 4
    assert captured_flow_rows(CUDAGraphMode.FULL, SimpleNamespace(num_tokens=16), 16, **rows) == 16  # no bucket
    assert captured_flow_rows(CUDAGraphMode.PIECEWISE, None, 16, **rows) is None  # split out: run eagerly
    assert captured_flow_rows(CUDAGraphMode.PIECEWISE, None, 16, **dict(rows, op_split=False)) == 16  # inside a piece
    assert captured_flow_rows(CUDAGraphMode.NONE, None, 16, **rows) is None  # eager
    assert captured_flow_rows(None, None, 16, **rows) is None
    # Model Runner V2 captures FULL graphs itself, under runtime mode NONE: never the eager path there
    assert captured_flow_rows(CUDAGraphMode.NONE, None, 16, **dict(rows, capturing=True)) == 16
    # V1's warm-up runs before a bucket's capture (runtime mode NONE): the bucket, as the capture will run it
    assert captured_flow_rows(CUDAGraphMode.NONE, None, 16, **dict(rows, capture_rows=8)) == 8
    assert captured_flow_rows(CUDAGraphMode.NONE, None, 4, **dict(rows, capturing=True, capture_rows=8)) == 4


def test_no_graphs_run_the_op_and_a_flat_graph_is_left_alone():
    assert flow_runs_as_op(_config(CUDAGraphMode.NONE), graph_path=False)
    assert flow_runs_as_op(_config(CUDAGraphMode.NONE, CompilationMode.DYNAMO_TRACE_ONCE), graph_path=False)
    flat = _config(CUDAGraphMode.PIECEWISE, splitting_ops=[])  # the user flattened the graph: no pieces,
    assert flat.cudagraph_mode == CUDAGraphMode.NONE  # so vLLM captures no graphs at all
    assert not split_piecewise_graphs_at_the_flow(flat) and flat.splitting_ops == []
    assert flow_runs_as_op(flat, graph_path=False)


@pytest.mark.parametrize("mode", list(CUDAGraphMode))
def test_only_a_mode_without_graphs_lets_the_op_write_into_the_layers_outputs(mode):
    """FlasSteer's in-place eager path (flow_rows.steer_in_place) branches on the step on the host: never where
    a CUDA graph might record it."""
    assert captures_no_graphs(_config(mode, CompilationMode.NONE)) == (mode == CUDAGraphMode.NONE)


def _steering_site(hidden, residual, positions, steered):
    """What FlasSteer.forward puts in the model's graph on the op path (engine/model.py)."""
    stream = hidden + residual
    flowed = torch.empty_like(stream)
    torch.ops.vllm.flas_steer(stream, positions, flowed, "model.layers.2.flas")
    return torch.where(steered, torch.zeros_like(hidden), hidden), torch.where(steered, flowed, residual)


def test_vllms_split_graph_runs_the_op_between_pieces_with_its_buffer_from_the_piece_before():
    register_steer_op()
    gm = torch.fx.symbolic_trace(_steering_site)
    _, items = split_graph(gm, _config(CUDAGraphMode.PIECEWISE).splitting_ops + [STEER_OP])
    splitting = [i for i in items if i.is_splitting_graph]
    assert len(splitting) == 1
    ops = [n for n in splitting[0].graph.graph.nodes if n.op == "call_function"]
    assert len(ops) == 1 and "flas_steer" in str(ops[0].target)  # the op alone, run eagerly
    before = [i for i in items if i.graph_id < splitting[0].graph_id]
    assert any("empty_like" in str(n.target) for i in before for n in i.graph.graph.nodes), \
        "the op's output buffer is allocated in the captured piece before it"
    after = [i for i in items if i.graph_id > splitting[0].graph_id]
    assert any("where" in str(n.target) for i in after for n in i.graph.graph.nodes)
