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
too. With FULL graphs (vLLM's default, FULL_AND_PIECEWISE, captures whole decode steps) the engine
option `flow_graphs` decides:
- "traced" (the default): the flow stays in the graph, on every token;
- "bucketed": the op is used in every mode and joins the splitting ops wherever vLLM's compiled graph
  has pieces; each FULL graph is captured once per steered bucket, the op running the flow
  graph-safe on that many rows (graph_buckets.py, patches/graph_dispatch.py); PIECEWISE steps
  (the op split out) and eager steps run it as above.
`graph_path` forces what FULL graphs run onto every step (the CPU tests of what FULL graphs run):
the traced flow, or with "bucketed" the op's graph-safe rows.
"""

from __future__ import annotations

from typing import Any

STEER_OP = "vllm::flas_steer"


def _is(mode: Any, name: str) -> bool:
    return mode is not None and getattr(mode, "name", str(mode)) == name


def _piecewise_compiled(cc: Any, bucketed: bool = False) -> bool:
    """Graph pieces over vLLM's compiled, split graph (breakable CUDA graphs compile nothing): PIECEWISE-only
    graphs, and with bucketed FULL graphs any mode that also captures pieces (FULL_AND_PIECEWISE)."""
    mode = cc.cudagraph_mode
    pieces = _is(mode, "PIECEWISE") or (bucketed and _is(mode, "FULL_AND_PIECEWISE"))
    return pieces and _is(cc.mode, "VLLM_COMPILE")


def split_piecewise_graphs_at_the_flow(compilation_config: Any, graph_path: bool = False,
                                       flow_graphs: str = "traced") -> bool:
    """Front end: where vLLM captures graph pieces over its compiled graph, add the flow's op to the splitting ops.

    Returns whether the flow runs as the op between graph pieces. Other modes are left as they are.
    The mode is the one configured: should vLLM fall back to PIECEWISE later, in the worker (an
    attention backend without full-graph support), a traced flow stays in the graph, as under FULL
    graphs; a bucketed one, already split out under FULL_AND_PIECEWISE, runs eagerly between the
    pieces. Where a graph mode has pieces but the op is not split out (breakable CUDA graphs, a
    compile mode other than VLLM_COMPILE, FULL turned into FULL_AND_PIECEWISE in the worker), the
    piece holds it: graph-safe on every token (`captured_flow_rows`), correct, no saving, not counted.
    """
    cc = compilation_config
    ops = cc.splitting_ops
    bucketed = flow_graphs == "bucketed"
    if (graph_path and not bucketed) or not (_piecewise_compiled(cc, bucketed) and ops):
        return False  # ops empty: the user flattened the graph (no pieces to run the op between)
    if STEER_OP not in ops:
        cc.splitting_ops = [*ops, STEER_OP]
    return True


def flow_runs_as_op(compilation_config: Any, graph_path: bool, flow_graphs: str = "traced") -> bool:
    """In the worker: does the flow run as the opaque op (no graphs, between PIECEWISE pieces, or bucketed)?"""
    if flow_graphs == "bucketed":
        return True
    if graph_path:
        return False
    return captures_no_graphs(compilation_config) or op_runs_between_pieces(compilation_config)


def captures_no_graphs(compilation_config: Any) -> bool:
    """No CUDA graph of any kind (CPU, enforce_eager): whatever runs outside a compiled graph runs eagerly."""
    mode = compilation_config.cudagraph_mode
    return mode is None or _is(mode, "NONE")


def op_runs_between_pieces(compilation_config: Any, flow_graphs: str = "traced") -> bool:
    """Does vLLM run the flow's op eagerly between the pieces of its compiled, split graph?"""
    cc = compilation_config
    return _piecewise_compiled(cc, flow_graphs == "bucketed") and STEER_OP in (cc.splitting_ops or [])



def captured_flow_rows(mode: Any, batch_descriptor: Any, n: int, *, op_split: bool, capturing: bool,
                       capture_rows: int | None) -> int | None:
    """The flow rows of the CUDA graph the op is being captured into, or None when it runs eagerly.

    - a FULL graph (V1 dispatches it): the bucket its batch descriptor carries (patches/graph_dispatch.py),
      every token if it carries none;
    - a PIECEWISE piece that holds the op (it is not split out): every token;
    - the warm-up runs and the capture of a bucket's graph (`capture_rows`, set around V1's
      `_warmup_and_capture` and V2's capture runs, which V2 makes under runtime mode NONE): that bucket,
      so warm-up runs what the capture records (a first call of any kernel, a compile or an autotune,
      happens before the capture, never inside it);
    - any other capture in progress (a capture path the patches do not know): every token. Never the
      eager path, which would bake one step's look at the data into the graph.
    """
    if _is(mode, "FULL"):
        return getattr(batch_descriptor, "flow_rows", n)
    if _is(mode, "PIECEWISE") and not op_split:
        return n
    if capture_rows is not None:
        return min(capture_rows, n)
    if capturing:
        return n
    return None
