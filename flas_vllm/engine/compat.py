"""Does a vLLM release still have everything flas-vllm wraps, subclasses or calls, with the same signature?

Reads the release's source without importing it (an installed package, a
source tree, or a wheel file), so a new vLLM can be checked before anyone
installs it: `flas-vllm check-vllm PATH` or `python -m flas_vllm.engine.compat PATH`.
Each anchor is reported OK, MISSING (gone, or no longer defined where we wrap
it) or CHANGED (its parameters or the source fragments we rely on moved).
The version guard in `patches/__init__.py` should only cover releases that pass.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Anchor:
    target: str  # "vllm.module.path:Qual.name"; "a | b": either place (it moved between releases)
    used_by: str  # the flas-vllm file that depends on it
    params: tuple[str, ...] = ()  # leading parameters, in order (a class: its __init__)
    keywords: tuple[str, ...] = ()  # parameters that must be accepted by name (not through **kwargs)
    contains: tuple[str, ...] = ()  # source fragments the definition must still contain


_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_V2_RUNNER = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
_V2_STATE = "vllm.v1.worker.gpu.model_states.default:DefaultModelState"
ANCHORS: tuple[Anchor, ...] = (
    # engine/patches/runner_hook.py
    Anchor(f"{_RUNNER}._prepare_inputs", "patches/runner_hook.py", ("self", "scheduler_output", "num_scheduled_tokens")),
    Anchor(f"{_RUNNER}._on_request_state_removed", "patches/runner_hook.py", ("self", "req_id", "req_state")),
    Anchor(f"{_RUNNER}.get_model", "patches/runner_hook.py, engine/worker_ext.py", ("self",)),
    Anchor(f"{_RUNNER}.__init__", "patches/runner_hook.py, cpu_seeded_rewind.py",
           contains=("self.requests: dict[str, CachedRequestState]", "self.input_batch = InputBatch(",
                     "self.discard_request_mask =")),
    Anchor("vllm.v1.worker.gpu_input_batch:InputBatch.req_ids", "patches/runner_hook.py", ("self",)),
    Anchor("vllm.v1.worker.gpu_input_batch:InputBatch.num_reqs", "patches/runner_hook.py", ("self",)),
    # engine/patches/dummy_runs.py: profiling and warm-up go through `_dummy_run` in both runners
    Anchor(f"{_RUNNER}._dummy_run", "patches/dummy_runs.py", ("self", "num_tokens")),
    Anchor(f"{_RUNNER}.profile_run", "patches/dummy_runs.py", ("self",), contains=("self._dummy_run(",)),
    Anchor(f"{_V2_RUNNER}._dummy_run", "patches/dummy_runs.py", ("self", "num_tokens")),
    Anchor(f"{_V2_RUNNER}.profile_run", "patches/dummy_runs.py", ("self",), contains=("self._dummy_run(",)),
    Anchor(f"{_V2_RUNNER}.execute_model", "patches/dummy_runs.py, engine/model_state.py",
           ("self", "scheduler_output"), contains=("InputBatch.make_dummy(", "self.model_state.prepare_inputs(")),
    Anchor(f"{_RUNNER}._sample", "patches/cpu_seeded_rewind.py", ("self", "logits", "spec_decode_metadata")),
    Anchor(f"{_RUNNER}._bookkeeping_sync", "patches/cpu_seeded_rewind.py", ("self",),
           contains=("discard_request_mask", "gen.set_offset(gen.get_offset() - 4)")),
    Anchor("vllm.v1.worker.gpu_input_batch:InputBatch.__init__", "patches/cpu_seeded_rewind.py",
           contains=("self.generators: dict[int, torch.Generator]",)),
    # engine/patches/admission.py
    Anchor("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "patches/admission.py",
           ("self", "request_id", "prompt", "params")),
    Anchor("vllm.v1.engine.input_processor:InputProcessor.__init__", "patches/admission.py",
           contains=("self.process_inputs_async = make_async(", "self.process_inputs,")),
    Anchor("vllm.exceptions:VLLMValidationError", "patches/admission.py"),
    # engine/patches/scheduler_admission.py
    Anchor("vllm.v1.core.sched.scheduler:Scheduler.schedule", "patches/scheduler_admission.py", ("self",)),
    Anchor("vllm.v1.core.sched.scheduler:Scheduler._handle_blocked_waiting_request",
           "patches/scheduler_admission.py", ("self", "request")),
    Anchor("vllm.v1.request:RequestStatus.RUNNING", "patches/scheduler_admission.py"),
    Anchor("vllm.v1.request:Request.__init__", "patches/scheduler_admission.py",
           contains=("self.sampling_params =", "self.status =", "self.num_computed_tokens =", "self.num_preemptions =")),
    Anchor("vllm.v1.core.sched.scheduler:Scheduler.__init__", "patches/scheduler_admission.py",
           contains=("self.requests: dict[str, Request]", "self.grammar_compile_error_reqs")),
    Anchor("vllm.v1.core.sched.scheduler:Scheduler.update_from_output", "patches/scheduler_admission.py",
           contains=("self.grammar_compile_error_reqs", "RequestStatus.FINISHED_ERROR")),
    Anchor("vllm.v1.engine:EngineCoreRequest.cache_salt", "patches/admission.py"),
    # engine/patches/engine_config.py, engine/checks.py
    Anchor("vllm.engine.arg_utils:EngineArgs.create_engine_config", "patches/engine_config.py",
           ("self", "usage_context", "headless")),
    *(Anchor(f"vllm.engine.arg_utils:EngineArgs.{name}", "engine/checks.py")
      for name in ("hf_overrides", "tensor_parallel_size", "pipeline_parallel_size", "enable_dbo", "ubatch_size")),
    Anchor("vllm.config.vllm:VllmConfig._get_v2_model_runner_unsupported_features", "patches/engine_config.py",
           ("self",)),
    Anchor("vllm.config.vllm:VllmConfig.use_v2_model_runner", "engine/checks.py", ("self",),
           contains=("envs.VLLM_USE_V2_MODEL_RUNNER", "self._get_v2_model_runner_unsupported_features()")),
    Anchor("vllm.config.vllm:VllmConfig.compute_hash", "engine/checks.py (compile-cache key)",
           contains=("self.model_config.compute_hash()",)),
    Anchor("vllm.config.model:ModelConfig.compute_hash", "engine/checks.py (compile-cache key)",
           contains=("get_hash_factors(self, ignored_factors)",)),
    Anchor("vllm.config.model:ModelConfig.hf_config", "engine/checks.py (compile-cache key)"),
    Anchor("vllm.config.model:ModelConfig.architectures", "engine/checks.py", ("self",)),
    *(Anchor(f"vllm.config.parallel:ParallelConfig.{name}", "engine/checks.py")
      for name in ("tensor_parallel_size", "pipeline_parallel_size", "enable_dbo", "ubatch_size")),
    # engine/model.py
    Anchor("vllm.model_executor.models.gemma2:Gemma2Model.__init__", "engine/model.py", ("self",),
           keywords=("vllm_config", "prefix"),
           contains=("self.embed_tokens", "self.start_layer, self.end_layer, self.layers", "self.norm")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2Model.forward", "engine/model.py",
           ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2Model.embed_input_ids", "engine/model.py, engine/runtime.py",
           ("self", "input_ids")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2DecoderLayer.forward", "engine/model.py, engine/runtime.py",
           ("self", "positions", "hidden_states", "residual")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2Attention.__init__", "engine/runtime.py",
           contains=("self.num_heads", "self.num_kv_heads", "self.head_dim", "self.scaling", "self.attn = Attention(")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2ForCausalLM.__init__", "engine/model.py", ("self",),
           keywords=("vllm_config", "prefix"),
           contains=("self.model = Gemma2Model(", "self.logits_processor = LogitsProcessor(",
                     "self.make_empty_intermediate_tensors")),
    Anchor("vllm.model_executor.models.gemma2:Gemma2ForCausalLM.load_weights", "engine/model.py",
           ("self", "weights")),
    Anchor("vllm.model_executor.layers.attention.attention:Attention", "engine/model.py",
           ("self", "num_heads", "head_size", "scale"),
           keywords=("num_kv_heads", "cache_config", "logits_soft_cap", "per_layer_sliding_window", "prefix")),
    Anchor("vllm.model_executor.layers.logits_processor:LogitsProcessor", "engine/model.py",
           ("self", "vocab_size"), keywords=("soft_cap",)),
    Anchor("vllm.model_executor.models.utils:maybe_prefix", "engine/model.py", ("prefix", "name")),
    Anchor("vllm.distributed.parallel_state:get_pp_group", "engine/model.py"),
    Anchor("vllm.distributed.parallel_state:get_tensor_model_parallel_world_size", "engine/model.py"),
    Anchor("vllm.utils.torch_utils:direct_register_custom_op", "engine/model.py",
           ("op_name", "op_func", "mutates_args", "fake_impl")),
    Anchor("vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm", "engine/flow_linears.py",
           ("layer", "remove_weight")),
    # engine/graph_modes.py: the flow's op as a splitting op under PIECEWISE-only graphs (matched by name)
    *(Anchor(f"vllm.config.compilation:CUDAGraphMode.{name}", "engine/graph_modes.py")
      for name in ("NONE", "PIECEWISE")),
    Anchor("vllm.config.compilation:CompilationMode.VLLM_COMPILE", "engine/graph_modes.py"),
    *(Anchor(f"vllm.config.compilation:CompilationConfig.{name}", "engine/graph_modes.py")
      for name in ("splitting_ops", "cudagraph_mode", "mode")),
    Anchor("vllm.compilation.partition_rules:should_split | vllm.backends.compiler.partition_rules:should_split",
           "engine/graph_modes.py", ("node", "splitting_ops"), contains=("_qualified_op_name in splitting_ops",)),
    Anchor("vllm.sequence:IntermediateTensors", "engine/model.py"),
    # engine/patches/graph_dispatch.py, engine/model.py: FULL graphs keyed by the steered bucket (flow_graphs="bucketed")
    *(Anchor(f"vllm.config.compilation:CUDAGraphMode.{name}", "engine/graph_modes.py, patches/graph_dispatch.py")
      for name in ("FULL", "FULL_AND_PIECEWISE")),
    Anchor("vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.get_capture_descs", "patches/graph_dispatch.py",
           ("self",)),
    Anchor("vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.dispatch", "patches/graph_dispatch.py",
           ("self", "num_tokens")),
    Anchor(f"{_RUNNER}._warmup_and_capture", "patches/graph_dispatch.py", ("self", "desc", "cudagraph_runtime_mode"),
           contains=("self._dummy_run(",)),
    Anchor(f"{_RUNNER}._capture_cudagraphs", "patches/graph_dispatch.py", ("self", "batch_descriptors"),
           contains=("self._warmup_and_capture(",)),
    Anchor(f"{_RUNNER}.capture_model", "patches/graph_dispatch.py", ("self",),
           contains=("self.cudagraph_dispatcher.get_capture_descs()",)),
    Anchor(f"{_RUNNER}._determine_batch_execution_and_padding", "patches/graph_dispatch.py", ("self", "num_tokens"),
           contains=("self.cudagraph_dispatcher.dispatch(",)),
    Anchor(f"{_RUNNER}.execute_model", "patches/graph_dispatch.py (a step publishes before it dispatches)",
           contains=("self._prepare_inputs(", "self._determine_batch_execution_and_padding(")),
    Anchor(f"{_RUNNER}.execute_model", "engine/step_buffers.py (a step is published inside V1's input-prep event)",
           contains=("self.synchronize_input_prep(),", "self._prepare_inputs(")),
    Anchor(f"{_RUNNER}.synchronize_input_prep", "engine/step_buffers.py", ("self",),
           contains=("self.prepare_inputs_event.synchronize()", "self.prepare_inputs_event.record()")),
    *(Anchor(f"vllm.forward_context:BatchDescriptor.{name}", "patches/graph_dispatch.py")
      for name in ("num_tokens", "num_active_loras")),
    Anchor("vllm.compilation.cuda_graph:CUDAGraphWrapper.__call__", "patches/graph_dispatch.py (keyed by bucket)",
           contains=("self.concrete_cudagraph_entries[batch_descriptor]",)),
    Anchor("vllm.v1.worker.gpu.cudagraph_utils:ModelCudaGraphManager.capture", "patches/graph_dispatch.py (V2)",
           ("self", "model"), contains=("super().capture(",)),
    Anchor("vllm.v1.worker.gpu.cudagraph_utils:CudaGraphManager.capture", "patches/graph_dispatch.py (V2)",
           ("self", "create_forward_fn"),
           contains=("self._capture_descs[mode]", "create_forward_fn(desc, warmup=", "forward_fn(CUDAGraphMode.NONE)",
                     "self.graphs[desc] = graph")),
    Anchor("vllm.v1.worker.gpu.cudagraph_utils:ModelCudaGraphManager.run_fullgraph", "patches/graph_dispatch.py (V2)",
           ("self", "desc"), contains=("super().run_fullgraph(desc)",)),
    Anchor("vllm.v1.worker.gpu.cudagraph_utils:CudaGraphManager.run_fullgraph", "patches/graph_dispatch.py (V2)",
           ("self", "desc"), contains=("assert desc in self.graphs",)),
    Anchor("vllm.v1.worker.gpu.cudagraph_utils:BatchExecutionDescriptor.num_tokens", "patches/graph_dispatch.py (V2)"),
    Anchor(f"{_V2_RUNNER}.execute_model", "patches/graph_dispatch.py (V2 publishes a step before it replays)",
           contains=("self.model_state.prepare_inputs(", "self.cudagraph_manager.run_fullgraph(")),
    *(Anchor(f"vllm.forward_context:ForwardContext.{name}", "engine/model.py, engine/concept_attention.py")
      for name in ("cudagraph_runtime_mode", "batch_descriptor", "no_compile_layers")),
    *(Anchor(target, "engine/model.py, engine/concept_attention.py (ops find their layers by name)") for target in (
        "vllm.forward_context:is_forward_context_available", "vllm.config.compilation:CompilationConfig.static_forward_context")),
    # engine/model_state.py (Model Runner V2)
    Anchor("vllm.v1.worker.gpu.model_states:resolve_model_state_cls", "engine/model.py (get_model_state_cls)",
           ("vllm_config", "model"), contains=('hasattr(model, "get_model_state_cls")', "model.get_model_state_cls()")),
    Anchor(_V2_STATE, "engine/model_state.py", ("self", "vllm_config", "model", "encoder_cache", "device")),
    Anchor(f"{_V2_STATE}.add_request", "engine/model_state.py", ("self", "req_index", "new_req_data")),
    Anchor(f"{_V2_STATE}.remove_request", "engine/model_state.py", ("self", "req_id")),
    Anchor(f"{_V2_STATE}.prepare_inputs", "engine/model_state.py", ("self", "input_batch", "req_states")),
    Anchor("vllm.v1.worker.gpu.model_states.interface:ModelState.__init__", "engine/model_state.py",
           contains=("self.max_num_reqs =",)),
    *(Anchor(f"vllm.v1.worker.gpu.input_batch:InputBatch.{name}", "engine/model_state.py")
      for name in ("req_ids", "num_reqs", "idx_mapping_np", "query_start_loc_np")),
    *(Anchor(f"vllm.v1.core.sched.output:NewRequestData.{name}", "engine/model_state.py")
      for name in ("req_id", "sampling_params")),
    Anchor(f"{_V2_RUNNER}.add_requests", "engine/model_state.py",
           contains=("self.model_state.add_request(req_index, new_req_data)",)),
    Anchor(f"{_V2_RUNNER}._remove_request", "engine/model_state.py",
           contains=("self.model_state.remove_request(req_id)",)),
    Anchor(f"{_V2_RUNNER}.finish_requests", "engine/model_state.py (preempted requests are removed)",
           contains=("preempted_req_ids",)),
    Anchor(f"{_V2_RUNNER}.execute_model", "engine/model_state.py",
           contains=("self.model_state.prepare_inputs(input_batch, self.req_states)",)),
    Anchor("vllm.v1.core.sched.scheduler:Scheduler.schedule", "engine/model_state.py (resumed = added again)",
           contains=("scheduled_new_reqs.extend(scheduled_resumed_reqs)",)),
    Anchor("vllm.config.vllm:VllmConfig.max_concurrent_batches", "engine/model_state.py", ("self",)),
    Anchor("vllm.config.speculative:SpeculativeConfig.enable_adaptive_verification", "engine/checks.py"),
    # engine/steered_attention.py: the flow's attention narrowed to the steered requests on vLLM's CPU backend
    Anchor("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "engine/steered_attention.py",
           contains=("query_start_loc: torch.Tensor", "seq_lens: torch.Tensor", "block_table: torch.Tensor",
                     "slot_mapping: torch.Tensor", "scheduler_metadata:", "use_sdpa_prefill", "encoder_cache")),
    Anchor("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build", "engine/steered_attention.py",
           contains=("ops.cpu_attn_get_scheduler_metadata(", "enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV",
                     "num_heads=self.num_heads", "head_dim=self.head_dim")),
    Anchor("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder._set_isa_to_layers",
           "engine/steered_attention.py", contains=("layer.isa = self.isa",)),
    Anchor("vllm._custom_ops:cpu_attn_get_scheduler_metadata", "engine/steered_attention.py",
           keywords=("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype", "query_start_loc",
                     "causal", "sliding_window_size", "isa", "enable_kv_split", "dynamic_causal", "kv_cache_dtype")),
    Anchor("vllm.model_executor.layers.attention.attention:get_attention_context", "engine/steered_attention.py",
           contains=("attn_metadata_raw[layer_name]", "slot_mapping.get(layer_name)")),
    # engine/plugin.py, serve/server.py, serve/routes.py
    Anchor("vllm.model_executor.models.registry:_ModelRegistry.register_model", "engine/plugin.py",
           ("self", "model_arch", "model_cls")),
    Anchor("vllm.model_executor.models.registry:_ModelRegistry.get_supported_archs", "engine/plugin.py",
           ("self",)),
    *(Anchor(f"vllm.entrypoints.common.cli_args:{name} | vllm.entrypoints.launchers.cli_args:{name}",
             "serve/server.py", (arg,))
      for name, arg in (("make_arg_parser", "parser"), ("validate_parsed_serve_args", "args"))),
    Anchor("vllm.entrypoints.launchers.api_server.entry:run_server", "serve/server.py", ("args",)),
    Anchor("vllm.logger:configure_logging_from_args", "serve/server.py", ("args",)),
    Anchor("vllm.utils.argparse_utils:FlexibleArgumentParser", "serve/server.py"),
    Anchor("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.init_state", "serve/routes.py",
           ("self", "engine_client", "state", "args")),
    Anchor("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.attach_router", "serve/routes.py",
           ("self", "app")),
)


@dataclass(frozen=True)
class Result:
    anchor: Anchor
    status: str  # OK, MISSING, CHANGED
    detail: str = ""


class VllmSource:
    """vLLM's Python files from an installed package, a source tree or a wheel, read as text."""

    def __init__(self, location: str | Path):
        self.location = Path(location)
        self._zip: zipfile.ZipFile | None = None
        self._root: Path | None = None
        if self.location.is_file() and self.location.suffix == ".whl":
            self._zip = zipfile.ZipFile(self.location)
        elif (self.location / "vllm" / "__init__.py").is_file():
            self._root = self.location / "vllm"
        elif (self.location / "__init__.py").is_file() and self.location.name == "vllm":
            self._root = self.location
        else:
            raise FileNotFoundError(
                f"{self.location}: not a vLLM wheel (.whl), a vllm package directory, or a directory holding one"
            )
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def installed(cls) -> "VllmSource":
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.origin:
            raise FileNotFoundError("vllm is not installed in this environment")
        return cls(Path(spec.origin).parent)

    def text(self, relpath: str) -> str | None:
        """relpath inside the package, e.g. 'config/vllm.py'."""
        if self._zip is not None:
            try:
                return self._zip.read(f"vllm/{relpath}").decode()
            except KeyError:
                return None
        path = self._root / relpath
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> tuple[ast.Module, str] | None:
        parts = dotted.split(".")[1:]
        for rel in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
            if rel in self._trees:
                tree = self._trees[rel]
                if tree is not None:
                    return tree, self.text(rel) or ""
                continue
            text = self.text(rel)
            self._trees[rel] = ast.parse(text) if text is not None else None
            if text is not None:
                return self._trees[rel], text
        return None

    def version(self) -> str:
        text = self.text("_version.py") or ""
        found = re.search(r"__version__\s*(?::[^=]+)?=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]", text)
        return found.group(1) if found else "unknown"


def _bindings(body: Iterable[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines (the last definition wins, as at run time)."""
    found: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def _resolve(source: VllmSource, target: str) -> tuple[ast.AST, str] | None:
    module, _, qualname = target.partition(":")
    loaded = source.module(module)
    if loaded is None:
        return None
    node: ast.AST = loaded[0]
    for part in qualname.split("."):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            return None
        node = _bindings(body).get(part)
        if node is None:
            return None
    return node, loaded[1]


def _signature(node: ast.AST) -> ast.arguments | None:
    if isinstance(node, ast.ClassDef):
        init = _bindings(node.body).get("__init__")
        return init.args if isinstance(init, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.args
    return None


def check_anchor(source: VllmSource, anchor: Anchor) -> Result:
    results = [_check_at(source, anchor, target.strip()) for target in anchor.target.split("|")]
    return next((r for r in results if r.status == "OK"), results[0])


def _check_at(source: VllmSource, anchor: Anchor, target: str) -> Result:
    found = _resolve(source, target)
    if found is None:
        return Result(anchor, "MISSING", "not defined there")
    node, text = found
    if anchor.params or anchor.keywords:
        args = _signature(node)
        if args is None:
            return Result(anchor, "CHANGED", "no longer a function or a class with __init__")
        positional = [a.arg for a in (*args.posonlyargs, *args.args)]
        named = set(positional) | {a.arg for a in args.kwonlyargs}
        if positional[: len(anchor.params)] != list(anchor.params):
            return Result(anchor, "CHANGED", f"parameters ({', '.join(positional)}), "
                                             f"expected to start ({', '.join(anchor.params)})")
        missing = [k for k in anchor.keywords if k not in named]
        if missing:
            return Result(anchor, "CHANGED", f"no parameter {', '.join(missing)}")
    if anchor.contains:
        segment = ast.get_source_segment(text, node) or ""
        absent = [frag for frag in anchor.contains if frag not in segment]
        if absent:
            return Result(anchor, "CHANGED", f"source no longer contains {absent[0]!r}")
    return Result(anchor, "OK")


def check(source: VllmSource, anchors: Iterable[Anchor] = ANCHORS) -> list[Result]:
    return [check_anchor(source, a) for a in anchors]


def _describe(anchor: Anchor) -> str:
    sig = ""
    if anchor.params or anchor.keywords:
        sig = "(" + ", ".join([*anchor.params, *("..." for _ in anchor.keywords[:1]), *anchor.keywords]) + ")"
    return anchor.target + sig


def report(source: VllmSource, results: list[Result]) -> str:
    lines = [f"vLLM {source.version()} at {source.location}"]
    for r in results:
        lines.append(f"{r.status:<8} {_describe(r.anchor)}  [{r.anchor.used_by}]" + (f": {r.detail}" if r.detail else ""))
    bad = sum(r.status != "OK" for r in results)
    lines.append(f"{len(results) - bad}/{len(results)} anchors OK" + ("" if not bad else f", {bad} not OK"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m flas_vllm.engine.compat [VLLM_WHEEL_OR_SOURCE_DIR]  (default: the installed vllm)")
        return 2
    try:
        source = VllmSource(args[0]) if args else VllmSource.installed()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = check(source)
    print(report(source, results))
    return 0 if all(r.status == "OK" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
