"""V1 runner: FULL CUDA graphs keyed by the step's steered bucket (`flow_graphs="bucketed"`).

vLLM keys its captured graphs by a `BatchDescriptor`, and already specialises them by active LoRA
adapters (`num_active_loras`). `SteeredBatchDescriptor` adds the flow's rows (graph_buckets.py) to
the key of FULL graphs only: PIECEWISE pieces do not hold the flow where its op is split out (vLLM's
compiled graph, graph_modes.py), so their keys are unchanged; where a piece does hold it, it runs
graph-safe on every token there. Four wraps:
- `CudagraphDispatcher.get_capture_descs`: each FULL descriptor once per bucket of its size, so
  vLLM's capture loop (and its capture-memory estimate) covers every graph a step may replay;
- `CudagraphDispatcher.dispatch`: a FULL dispatch carries the step's bucket (the runtime's
  `graph_flow_rows`), so the FULL wrapper replays (or, while capturing, records) that bucket's graph;
- `GPUModelRunner._warmup_and_capture`: while one descriptor is warmed up and captured the runtime
  answers with its bucket (`FlasRuntime.capturing`), and the flow's op runs on that many rows
  (model.py), in the warm-up runs too, so the capture records nothing that runs for the first time.
- `GPUModelRunner._determine_batch_execution_and_padding`: real steps replayed as FULL graphs never
  run the op, so their flow rows are counted here. The dispatcher learns the model's runtime from the runner (`attach`), in
the runner's dummy runs (before any capture) and before each real step. Engines not bucketed are
untouched: without an attached bucketed runtime every wrap returns what vLLM returns.

Model Runner V2 keys its graphs in its own `CudaGraphManager`: not patched (README).
"""

from __future__ import annotations

import dataclasses
import functools

from . import wrap_once


@functools.cache
def steered_descriptor_class():
    """vLLM's BatchDescriptor plus the FULL graph's flow rows (a frozen dataclass, so a distinct graph key)."""
    from vllm.forward_context import BatchDescriptor  # lazy: vllm; patches install only inside vLLM

    @dataclasses.dataclass(frozen=True)
    class SteeredBatchDescriptor(BatchDescriptor):
        flow_rows: int = 0
        """Rows the FLAS flow computes in this FULL graph: the first flow_rows of the graph row order."""

    SteeredBatchDescriptor.__module__ = __name__
    SteeredBatchDescriptor.__qualname__ = "SteeredBatchDescriptor"
    globals()["SteeredBatchDescriptor"] = SteeredBatchDescriptor  # found by name (pickle) like a module-level class
    return SteeredBatchDescriptor


def with_flow_rows(desc, flow_rows: int):
    fields = {f.name: getattr(desc, f.name) for f in dataclasses.fields(desc) if f.name != "flow_rows"}
    return steered_descriptor_class()(**fields, flow_rows=flow_rows)


def _bucketed_runtime(owner):
    runtime = getattr(owner, "flas_runtime", None)
    return runtime if runtime is not None and runtime.flow_path == "bucketed" else None


def attach(runner) -> None:
    """Tell the runner's dispatcher the model's runtime (once the model is loaded)."""
    dispatcher = getattr(runner, "cudagraph_dispatcher", None)
    model = getattr(runner, "model", None)
    runtime = getattr(model, "flas_runtime", None) if model is not None else None
    if dispatcher is not None and runtime is not None:
        dispatcher.flas_runtime = runtime


def _is_full(mode) -> bool:
    return getattr(mode, "name", None) == "FULL"


def _make_capture_descs(original):
    @functools.wraps(original)
    def get_capture_descs(self):
        result = original(self)
        runtime = _bucketed_runtime(self)
        if runtime is None:
            return result
        from flas_vllm.engine.graph_buckets import flow_row_buckets  # cycle-free: pure module

        out = []
        for mode, descs in result:
            if _is_full(mode):
                descs = [with_flow_rows(d, b) for d in descs
                         for b in reversed(flow_row_buckets(d.num_tokens, runtime.graph_bucket_min))]
            out.append((mode, descs))
        return out

    return get_capture_descs


def _make_dispatch(original):
    @functools.wraps(original)
    def dispatch(self, *args, **kwargs):
        mode, desc = original(self, *args, **kwargs)
        runtime = _bucketed_runtime(self)
        if runtime is not None and _is_full(mode):
            desc = with_flow_rows(desc, runtime.graph_flow_rows(desc.num_tokens))
        return mode, desc

    return dispatch


def _make_warmup_and_capture(original):
    @functools.wraps(original)
    def _warmup_and_capture(self, desc, *args, **kwargs):
        attach(self)
        runtime = _bucketed_runtime(getattr(self, "cudagraph_dispatcher", None))
        if runtime is None:
            return original(self, desc, *args, **kwargs)
        with runtime.capturing(getattr(desc, "flow_rows", None)):
            return original(self, desc, *args, **kwargs)

    return _warmup_and_capture


def _make_determine(original):
    @functools.wraps(original)
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        mode, desc = result[0], result[1]
        runtime = _bucketed_runtime(getattr(self, "cudagraph_dispatcher", None))
        if runtime is not None and _is_full(mode) and not runtime.state.profiling:
            rows = getattr(desc, "flow_rows", desc.num_tokens)
            if rows:  # a step with flow work (the skip path counts the same)
                runtime.count_flow_rows(runtime.state.steered_rows, rows)
        return result

    return _determine_batch_execution_and_padding


def install() -> bool:
    # lazy: vllm; patches install only inside vLLM
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    done = wrap_once(CudagraphDispatcher, "get_capture_descs", _make_capture_descs)
    done |= wrap_once(CudagraphDispatcher, "dispatch", _make_dispatch)
    done |= wrap_once(GPUModelRunner, "_warmup_and_capture", _make_warmup_and_capture)
    done |= wrap_once(GPUModelRunner, "_determine_batch_execution_and_padding", _make_determine)
    return done
