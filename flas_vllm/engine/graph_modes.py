"""Where the flow runs in vLLM's compile and CUDA-graph modes: inside the graph, or as an opaque op.

The flow can run two ways (engine/model.py):
- as the opaque op `vllm::flas_steer` (the skip path): eager code that may look at the step,
  so a step with no steered token does no flow work and a mixed step computes only its steered
  tokens (engine/flow_rows.py). Nothing may capture it in a CUDA graph, which would replay the
  work of the capture step whatever the next step steers;
- traced into the model's graph on every token (the graph path), which any graph mode can capture.

Without CUDA graphs the op is used. With PIECEWISE-only CUDA graphs (`cudagraph_mode=PIECEWISE`,
chosen by the user) the op joins vLLM's splitting ops: the graph is cut around it as around
attention, the pieces are captured, and the op runs eagerly between them, so the op is used there
too. With FULL graphs (vLLM's default, FULL_AND_PIECEWISE, captures whole decode steps) the flow
stays in the graph: see the README's "Under CUDA graphs" for why and what would change that.
`graph_path` forces the graph path anywhere (the CPU tests of what FULL graphs run).
"""

from __future__ import annotations

from typing import Any

STEER_OP = "vllm::flas_steer"


def _is(mode: Any, name: str) -> bool:
    return mode is not None and getattr(mode, "name", str(mode)) == name


def _piecewise_compiled(cc: Any) -> bool:
    """PIECEWISE-only graphs over vLLM's compiled, split graph (breakable CUDA graphs compile nothing)."""
    return _is(cc.cudagraph_mode, "PIECEWISE") and _is(cc.mode, "VLLM_COMPILE")


def split_piecewise_graphs_at_the_flow(compilation_config: Any, graph_path: bool = False) -> bool:
    """Front end: under PIECEWISE-only graphs with vLLM's compile, add the flow's op to the splitting ops.

    Returns whether the flow runs as the op between graph pieces. Other modes are left as they are.
    The mode is the one configured: should vLLM fall back to PIECEWISE later, in the worker (an
    attention backend without full-graph support), the flow stays in the graph, as under FULL graphs.
    """
    cc = compilation_config
    ops = cc.splitting_ops
    if graph_path or not (_piecewise_compiled(cc) and ops):
        return False  # ops empty: the user flattened the graph (no pieces to run the op between)
    if STEER_OP not in ops:
        cc.splitting_ops = [*ops, STEER_OP]
    return True


def flow_runs_as_op(compilation_config: Any, graph_path: bool) -> bool:
    """In the worker: does the flow run as the opaque op (no graphs, or between PIECEWISE pieces)?"""
    if graph_path:
        return False
    mode = compilation_config.cudagraph_mode
    if mode is None or _is(mode, "NONE"):
        return True
    return _piecewise_compiled(compilation_config) and STEER_OP in (compilation_config.splitting_ops or [])
