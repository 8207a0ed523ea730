"""What flas-vllm wraps, subclasses or calls in vLLM: one `Anchor` each, checked by engine/compat.py.

A new dependency on a vLLM internal gets its anchor here, so `flas-vllm check-vllm` covers it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    *(Anchor(f"vllm.v1.attention.backends.{module}", "engine/steered_attention.py (GPU backends)",
             contains=("num_actual_tokens: int", "max_query_len: int", "query_start_loc: torch.Tensor",
                       "max_seq_len: int", "seq_lens: torch.Tensor", "block_table: torch.Tensor",
                       "slot_mapping: torch.Tensor", "scheduler_metadata:", *features))
      for module, features in (
          ("flash_attn:FlashAttentionMetadata", ("causal:", "dcp_context_kv_lens", "mm_prefix_query_range_tensor",
                                                 "rswa_prefix_lens")),
          ("triton_attn:TritonAttentionMetadata", ("causal:", "mm_prefix_range_tensor", "rswa_prefix_lens")))),
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
