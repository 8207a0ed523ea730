"""FULL CUDA graphs keyed by the steered bucket, as vLLM's V1 dispatcher holds them (patches/graph_dispatch.py).

CPU cannot capture CUDA graphs. What decides which graph a step replays is plain Python, so it runs
here: vLLM's own `CudagraphDispatcher` (FULL_AND_PIECEWISE, decode sizes 1-32) with the patch, fed by a
real `FlasRuntime` whose steps are published as the runner publishes them. Checked: every key a step
can dispatch to is one vLLM captures; each FULL key carries the smallest bucket that holds the step's
steered tokens; PIECEWISE keys (the op runs between pieces) and engines that are not bucketed are
vLLM's unchanged; a capture sees its own bucket; replayed steps are counted.
"""

from __future__ import annotations

import dataclasses
import pickle
from types import SimpleNamespace

import pytest
import torch

from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.forward_context import BatchDescriptor
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.engine.graph_buckets import MIN_BUCKET_ENV, flow_row_buckets, graph_flow_rows
from flas_vllm.engine.patches import graph_dispatch
from flas_vllm.engine.runtime import FlasRuntime
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState
from tests.test_slot_table import G

SIZES = [1, 2, 4, 8, 16, 24, 32]
MAX_SEQS = 32


@pytest.fixture(autouse=True)
def _small_buckets(monkeypatch):
    monkeypatch.setenv(MIN_BUCKET_ENV, "4")  # buckets below 64 rows, so these sizes have some
    graph_dispatch.install()


def _runtime(flow_path: str = "bucketed") -> FlasRuntime:
    state = StepState.allocate(64, torch.float32, "cpu")
    state.graph_rows_wanted = True
    table = SlotTableKV(G, num_blocks=1, capacity=4, max_len=16, dtype=torch.float32, device="cpu", state=state)
    runtime = FlasRuntime(None, FlasEngineOptions(checkpoint="c"), SimpleNamespace(dtype=torch.float32), (3, 3), 16,
                          table, state, "tokenizer", {})
    runtime.group_by_length = True
    runtime.flow_path = flow_path
    return runtime


def _dispatcher(runtime: FlasRuntime | None) -> CudagraphDispatcher:
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                           cudagraph_capture_sizes=SIZES, max_cudagraph_capture_size=SIZES[-1])
    cc.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")  # as VllmConfig resolves it
    config = SimpleNamespace(compilation_config=cc, num_speculative_tokens=0, lora_config=None,
                             scheduler_config=SimpleNamespace(max_num_seqs=MAX_SEQS))
    dispatcher = CudagraphDispatcher(config)
    dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    if runtime is not None:
        dispatcher.flas_runtime = runtime
    return dispatcher


def _decode_step(runtime: FlasRuntime, steered: int, tokens: int) -> None:
    """`tokens` decode requests, the first `steered` of them steered (one token each), as the runner publishes."""
    row = RequestRow(True, 1, 3, 0.25)
    runtime.publish(StepRows.of([row] * steered + [RequestRow()] * (tokens - steered), [1] * tokens))


def test_full_graphs_are_captured_once_per_bucket_and_pieces_once():
    plain = dict(_dispatcher(None).get_capture_descs())
    bucketed = dict(_dispatcher(_runtime()).get_capture_descs())
    assert bucketed[CUDAGraphMode.PIECEWISE] == plain[CUDAGraphMode.PIECEWISE]  # the op runs between pieces
    full = bucketed[CUDAGraphMode.FULL]
    want = [(d.num_tokens, b) for d in plain[CUDAGraphMode.FULL] for b in reversed(flow_row_buckets(d.num_tokens))]
    assert [(d.num_tokens, d.flow_rows) for d in full] == want  # largest first, as vLLM captures
    assert len(full) == sum(len(flow_row_buckets(n)) for n in SIZES)
    for d in full:  # the rest of each key is vLLM's own
        base = {f.name: getattr(d, f.name) for f in dataclasses.fields(BatchDescriptor)}
        assert BatchDescriptor(**base) in plain[CUDAGraphMode.FULL]
    assert len(set(full)) == len(full)  # distinct keys: one graph each
    assert pickle.loads(pickle.dumps(full[0])) == full[0]  # a module-level class by name, like vLLM's own


def test_every_decode_step_replays_a_captured_graph_of_its_bucket():
    runtime = _runtime()
    dispatcher = _dispatcher(runtime)
    captured = set(dict(dispatcher.get_capture_descs())[CUDAGraphMode.FULL])
    for tokens in range(1, MAX_SEQS + 1):
        for steered in range(tokens + 1):
            _decode_step(runtime, steered, tokens)
            mode, desc = dispatcher.dispatch(tokens, uniform_decode=True)
            assert mode == CUDAGraphMode.FULL and desc in captured, (tokens, steered, desc)
            assert desc.flow_rows == graph_flow_rows(steered, desc.num_tokens) >= steered
    _decode_step(runtime, 0, 20)
    assert dispatcher.dispatch(20, uniform_decode=True)[1].flow_rows == 0  # nothing steered: no flow work
    _decode_step(runtime, 5, 20)
    assert dispatcher.dispatch(20, uniform_decode=True)[1].flow_rows == 6  # padded to 24 tokens: 24/4


def test_mixed_steps_and_other_engines_dispatch_as_vllm_does():
    runtime = _runtime()
    dispatcher = _dispatcher(runtime)
    runtime.publish(StepRows.of([RequestRow(True, 1, 3, 0.25), RequestRow()], [7, 5]))  # a prefill chunk
    mode, desc = dispatcher.dispatch(12, uniform_decode=False)
    assert mode == CUDAGraphMode.PIECEWISE and type(desc) is BatchDescriptor  # the op runs eagerly between pieces
    assert dispatcher.dispatch(100, uniform_decode=False) == (CUDAGraphMode.NONE, BatchDescriptor(100))
    for other in (_dispatcher(None), _dispatcher(_runtime("skip"))):
        assert other.dispatch(8, uniform_decode=True) == _dispatcher(None).dispatch(8, uniform_decode=True)
        assert type(other.dispatch(8, uniform_decode=True)[1]) is BatchDescriptor


def test_a_capture_dispatches_to_the_bucket_it_captures():
    runtime = _runtime()
    dispatcher = _dispatcher(runtime)
    seen = {}

    def warmup_and_capture(runner, desc, cudagraph_runtime_mode=None):  # stands in for vLLM's: it dispatches again
        with runtime.profiling():  # as patches/dummy_runs.py runs every dummy batch
            seen[desc.flow_rows] = dispatcher.dispatch(desc.num_tokens, uniform_decode=True)[1]

    wrapped = graph_dispatch._make_warmup_and_capture(warmup_and_capture)
    runner = SimpleNamespace(cudagraph_dispatcher=dispatcher, model=SimpleNamespace(flas_runtime=runtime))
    descs = [d for d in dict(dispatcher.get_capture_descs())[CUDAGraphMode.FULL] if d.num_tokens == 16]
    for desc in descs:
        wrapped(runner, desc, cudagraph_runtime_mode=CUDAGraphMode.FULL)
    assert {b: d for b, d in seen.items()} == {d.flow_rows: d for d in descs}
    assert runtime.capture_rows is None
    with runtime.profiling():  # any other dummy batch: every token
        assert dispatcher.dispatch(16, uniform_decode=True)[1].flow_rows == 16


def test_replayed_steps_are_counted_at_dispatch():
    runtime = _runtime()
    dispatcher = _dispatcher(runtime)
    runner = SimpleNamespace(cudagraph_dispatcher=dispatcher)

    def determine(runner, num_tokens):
        mode, desc = dispatcher.dispatch(num_tokens, uniform_decode=True)
        return mode, desc, False, None, None

    wrapped = graph_dispatch._make_determine(determine)
    _decode_step(runtime, 3, 16)
    wrapped(runner, 16)
    _decode_step(runtime, 0, 16)
    wrapped(runner, 16)
    with runtime.profiling():
        wrapped(runner, 16)  # a dummy batch: not a step
    assert (runtime.flow_steps, runtime.steered_tokens, runtime.flow_rows) == (1, 3, 4)  # the step with flow work
    assert list(runtime.flow_log) == [(16, 3, 4)]


# -- Model Runner V2: its CudaGraphManager captures and replays FULL graphs itself -----------------------
# Its capture loop needs CUDA; a stand-in runs the loop's shape (vLLM's `CudaGraphManager.capture`: per mode,
# per descriptor, create_forward_fn(desc, warmup=...) then forward_fn(NONE), graphs keyed by the descriptor)
# around the real wraps, and the real `BatchExecutionDescriptor`.


def _v2_manager(runtime):
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor as Desc

    full = [Desc(cg_mode=CUDAGraphMode.FULL, num_tokens=n, num_reqs=n, uniform_token_count=1) for n in (16, 8, 4, 2, 1)]
    pieces = [Desc(cg_mode=CUDAGraphMode.PIECEWISE, num_tokens=n, num_reqs=None) for n in (32, 16)]
    return SimpleNamespace(flas_runtime=runtime, graphs={},
                           _capture_descs={CUDAGraphMode.PIECEWISE: pieces, CUDAGraphMode.FULL: full})


def _v2_capture_loop(manager, create_forward_fn, progress_bar_desc="Capturing CUDA graphs"):
    """The shape of vLLM's loop: per mode and descriptor, a warm-up run, then the captured run, keyed by desc."""
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL):
        for desc in manager._capture_descs[mode]:
            create_forward_fn(desc, warmup=True)(CUDAGraphMode.NONE)
            create_forward_fn(desc, warmup=False)(CUDAGraphMode.NONE)
            manager.graphs[desc] = "graph"


def test_v2_captures_each_full_graph_once_per_bucket_and_replays_the_steps_bucket():
    runtime = _runtime()
    manager = _v2_manager(runtime)
    seen_rows = {}  # descriptor -> the capture bucket the runtime answered while its runs ran

    def create_forward_fn(desc, warmup):
        def forward_fn(cg_mode):
            seen_rows.setdefault(desc, set()).add(runtime.capture_rows)
        return forward_fn

    capture = graph_dispatch._make_v2_capture(_v2_capture_loop)
    capture(manager, create_forward_fn)
    full = manager._capture_descs[CUDAGraphMode.FULL]
    assert [(d.num_tokens, d.flow_rows) for d in full] == [(n, b) for n in (16, 8, 4, 2, 1)
                                                           for b in reversed(flow_row_buckets(n))]
    assert all(seen_rows[d] == {d.flow_rows} for d in full)  # warm-up and capture run the bucket's rows
    assert all(seen_rows[d] == {None} for d in manager._capture_descs[CUDAGraphMode.PIECEWISE])  # the op runs eagerly
    assert runtime.capture_rows is None
    capture(manager, create_forward_fn)  # the real capture after memory profiling's: not expanded twice
    assert manager._capture_descs[CUDAGraphMode.FULL] == full

    replayed = []
    run_fullgraph = graph_dispatch._make_v2_run_fullgraph(
        lambda self, desc: replayed.append(desc) or self.graphs[desc])  # vLLM's asserts the graph exists
    base = {d.num_tokens: d for d in _v2_manager(None)._capture_descs[CUDAGraphMode.FULL]}
    for tokens in (1, 2, 4, 8, 16):
        for steered in range(tokens + 1):
            _decode_step(runtime, steered, tokens)
            assert run_fullgraph(manager, base[tokens]) == "graph"
            assert replayed[-1].flow_rows == graph_flow_rows(steered, tokens, smallest=4)
    assert runtime.flow_steps == sum(1 for t in (1, 2, 4, 8, 16) for s in range(1, t + 1))  # steps with flow work


def test_v2_managers_of_other_engines_are_untouched():
    manager = _v2_manager(_runtime("skip"))
    before = dict(manager._capture_descs)
    graph_dispatch._make_v2_capture(lambda self, fn: None)(manager, lambda d, warmup: None)
    assert manager._capture_descs == before
    desc = before[CUDAGraphMode.FULL][0]
    assert graph_dispatch._make_v2_run_fullgraph(lambda self, d: d)(manager, desc) is desc
    model = SimpleNamespace(flas_runtime=_runtime())
    holder = SimpleNamespace()
    graph_dispatch._make_v2_model_capture(lambda self, model: None)(holder, model)
    assert holder.flas_runtime is model.flas_runtime  # learnt from the model it captures
