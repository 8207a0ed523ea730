"""FULL CUDA graphs keyed by the step's steered bucket (`flow_graphs="bucketed"`), in both model runners.

vLLM keys its captured graphs by a frozen dataclass (V1: `BatchDescriptor`, V2:
`BatchExecutionDescriptor`) and already specialises them by active LoRA adapters
(`num_active_loras`). `steered_class` adds the flow's rows (graph_buckets.py) to the key of FULL
graphs only: PIECEWISE pieces do not hold the flow where its op is split out (vLLM's compiled
graph, graph_modes.py), so their keys are unchanged; where a piece does hold it, it runs
graph-safe on every token there.

V1 (`GPUModelRunner` and its `CudagraphDispatcher`), four wraps:
- `CudagraphDispatcher.get_capture_descs`: each FULL descriptor once per bucket of its size, so
  vLLM's capture loop (and its capture-memory estimate) covers every graph a step may replay;
- `CudagraphDispatcher.dispatch`: a FULL dispatch carries the step's bucket (the runtime's
  `graph_flow_rows`; V1 publishes the step in `_prepare_inputs`, before it dispatches), so the FULL
  wrapper replays (or, while capturing, records) that bucket's graph;
- `GPUModelRunner._warmup_and_capture`: while one descriptor is warmed up and captured the runtime
  answers with its bucket (`FlasRuntime.capturing`), and the flow's op runs on that many rows
  (model.py), in the warm-up runs too, so the capture records nothing that runs for the first time;
- `GPUModelRunner._determine_batch_execution_and_padding`: real steps replayed as FULL graphs never
  run the op, so their flow rows are counted here.
The dispatcher learns the model's runtime from the runner (`attach`), in the runner's dummy runs
(before any capture) and before each real step.

Model Runner V2 (`CudaGraphManager`, which captures and replays FULL graphs itself), three wraps:
- `ModelCudaGraphManager.capture`: learns the model's runtime;
- `CudaGraphManager.capture`: its FULL descriptors once per bucket (once; memory profiling captures
  a sample first), and each warm-up and capture run inside `FlasRuntime.capturing` (V2 captures
  under runtime mode NONE, so the op goes by the runtime's capture bucket);
- `ModelCudaGraphManager.run_fullgraph`: the replayed key carries the step's bucket (V2 publishes the
  step in the model state's `prepare_inputs`, before it replays), counted in the stats.

Engines not bucketed are untouched: without an attached bucketed runtime every wrap returns what
vLLM returns. None of this has run on a GPU (README)."""

from __future__ import annotations

import dataclasses
import functools

from . import wrap_once


@functools.cache
def steered_class(base: type) -> type:
    """A frozen dataclass key of vLLM's (V1's `BatchDescriptor`, V2's `BatchExecutionDescriptor`) plus the FULL
    graph's flow rows: the first `flow_rows` of the graph row order. A distinct class, so a distinct graph key."""

    name = f"Steered{base.__name__}"
    cls = dataclasses.make_dataclass(name, [("flow_rows", int, dataclasses.field(default=0))], bases=(base,),
                                     frozen=True)
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls  # found by name (pickle), like a module-level class
    return cls


def with_flow_rows(desc, flow_rows: int):
    """`desc` (a vLLM graph key, steered or not) keyed by `flow_rows` as well."""
    base = next(c for c in type(desc).__mro__ if not c.__name__.startswith("Steered"))
    fields = {f.name: getattr(desc, f.name) for f in dataclasses.fields(desc) if f.name != "flow_rows"}
    return steered_class(base)(**fields, flow_rows=flow_rows)


def expand_by_bucket(descs, runtime) -> list:
    """Each FULL graph key once per bucket of its size, largest bucket first."""
    from flas_vllm.engine.graph_buckets import flow_row_buckets  # cycle-free: pure module

    return [with_flow_rows(d, b) for d in descs for b in reversed(flow_row_buckets(d.num_tokens, runtime.graph_bucket_min))]


def _bucketed_runtime(owner):
    runtime = getattr(owner, "flas_runtime", None)
    return runtime if runtime is not None and runtime.flow_path == "bucketed" else None


def attach(runner) -> None:
    """Tell the runner's graph dispatcher (V1) or manager (V2) the model's runtime (once the model is loaded)."""
    model = getattr(runner, "model", None)
    runtime = getattr(model, "flas_runtime", None) if model is not None else None
    for name in ("cudagraph_dispatcher", "cudagraph_manager"):
        keeper = getattr(runner, name, None)
        if keeper is not None and runtime is not None:
            keeper.flas_runtime = runtime


def _is_full(mode) -> bool:
    return getattr(mode, "name", None) == "FULL"


def _make_capture_descs(original):
    @functools.wraps(original)
    def get_capture_descs(self):
        result = original(self)
        runtime = _bucketed_runtime(self)
        if runtime is None:
            return result
        return [(mode, expand_by_bucket(descs, runtime) if _is_full(mode) else descs) for mode, descs in result]

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


# -- Model Runner V2: its CudaGraphManager keys, captures and replays FULL graphs itself ------------------


def _make_v2_model_capture(original):
    @functools.wraps(original)
    def capture(self, model, *args, **kwargs):
        runtime = getattr(model, "flas_runtime", None)
        if runtime is not None:
            self.flas_runtime = runtime
        return original(self, model, *args, **kwargs)

    return capture


def _make_v2_capture(original):
    @functools.wraps(original)
    def capture(self, create_forward_fn, *args, **kwargs):
        runtime = _bucketed_runtime(self)
        if runtime is None:
            return original(self, create_forward_fn, *args, **kwargs)
        full = self._capture_descs.get(_full_mode())
        if full and not hasattr(full[0], "flow_rows"):  # once: memory profiling captures first, then the real capture
            self._capture_descs[_full_mode()] = expand_by_bucket(full, runtime)

        def keyed_forward_fn(desc, *a, **kw):
            forward_fn = create_forward_fn(desc, *a, **kw)
            rows = getattr(desc, "flow_rows", None)

            def run(cg_mode):  # warm-up and capture run the bucket's rows (V2 captures under runtime mode NONE)
                with runtime.capturing(rows):
                    return forward_fn(cg_mode)

            return run

        return original(self, keyed_forward_fn, *args, **kwargs)

    return capture


def _make_v2_run_fullgraph(original):
    @functools.wraps(original)
    def run_fullgraph(self, desc, *args, **kwargs):
        runtime = _bucketed_runtime(self)
        if runtime is not None:  # V2 publishes the step (model_state.prepare_inputs) before it replays
            rows = runtime.graph_flow_rows(desc.num_tokens)
            desc = with_flow_rows(desc, rows)
            if rows and not runtime.state.profiling:
                runtime.count_flow_rows(runtime.state.steered_rows, rows)
        return original(self, desc, *args, **kwargs)

    return run_fullgraph


def _full_mode():
    from vllm.config import CUDAGraphMode  # lazy: vllm

    return CUDAGraphMode.FULL


def install() -> bool:
    # lazy: vllm; patches install only inside vLLM
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager, ModelCudaGraphManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    done = wrap_once(CudagraphDispatcher, "get_capture_descs", _make_capture_descs)
    done |= wrap_once(CudagraphDispatcher, "dispatch", _make_dispatch)
    done |= wrap_once(GPUModelRunner, "_warmup_and_capture", _make_warmup_and_capture)
    done |= wrap_once(GPUModelRunner, "_determine_batch_execution_and_padding", _make_determine)
    done |= wrap_once(ModelCudaGraphManager, "capture", _make_v2_model_capture)
    done |= wrap_once(CudaGraphManager, "capture", _make_v2_capture)
    done |= wrap_once(ModelCudaGraphManager, "run_fullgraph", _make_v2_run_fullgraph)
    return done
