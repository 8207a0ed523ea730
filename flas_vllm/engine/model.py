"""FLAS on vLLM's own model classes: the flow after decoder layer L of any registered family.

`flas_vllm.core.families` names, per family, the vLLM causal LM to extend; each family's
steered class is defined below as `class Flas<Family>ForCausalLM(FlasCausalLMMixin, <vLLM class>)`.
The base model is built exactly as vLLM builds it, then a forward hook on layer L hands the
layer's output (hidden, residual) to a `FlasSteer` module. Every token of a steered request has its
residual stream replaced by the Euler-integrated flow of its own request; unsteered tokens
pass through `torch.where` untouched, so they are bit-identical to the vanilla model.
The flow's causal self-attention gets one paged vLLM `Attention` per (Euler step, block),
named `<text model>.flas_steps.{num_hidden_layers + k*num_blocks + b}.attn` (vLLM wants
exactly one integer in a layer name).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from flas_vllm.core.checkpoint import load_checkpoint
from flas_vllm.core.concept import inference_concept_len
from flas_vllm.core.errors import FlasCheckpointError
from flas_vllm.core.concept_encoder import build_own_encoder
from flas_vllm.core.config import FlasEngineOptions, FlowGeometry
from flas_vllm.engine.checks import (CONCEPT_ATTENTION_ATTR, check_fingerprint, check_flow_kv_dtype, check_runner,
                                     flow_layer_indices)
from flas_vllm.core.families import text_config
from flas_vllm.engine.flow_linears import prepare_engine_linears, use_engine_linears
from flas_vllm.engine.flow_rows import integrate_graph_rows, integrate_rows, residual_stream, steer_in_place
from flas_vllm.engine.graph_modes import (captured_flow_rows, captures_no_graphs, flow_runs_as_op,
                                          op_runs_between_pieces)
from flas_vllm.engine.runtime import FlasRuntime
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.steered_attention import SteeredAttention
from flas_vllm.engine.step_state import StepState
from flas_vllm.engine.time_table import TimeTable, time_table_rows

logger = logging.getLogger(__name__)

def _flas_steer(stream: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, target: str) -> None:
    """Write the steered tokens' residual stream after the flow into `out`; other rows stay unwritten
    (never selected).

    Opaque to the compiler, so it may look at the data: no steered token, no flow work at all.
    It reads the stream (not the layer's hidden/residual pair, which it leaves alone), so the layer's
    outputs are only read by fused ops and the choice of rows stays a `torch.where` in the graph:
    unsteered tokens compile exactly as in vanilla's graph. It writes into a buffer the graph
    allocates, as vLLM's attention ops do: between PIECEWISE graph pieces (graph_modes.py) the next
    piece reads what the op wrote at the address it was captured with.
    Finds its `FlasSteer` by name in the forward context, as vLLM's own custom ops find their layers.
    """
    get_forward_context().no_compile_layers[target].steer_into(positions, stream, out)


def _flas_steer_fake(stream: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, target: str) -> None:
    return None


def register_steer_op() -> None:
    """`vllm::flas_steer` (graph_modes.STEER_OP), once per process."""
    if hasattr(torch.ops.vllm, "flas_steer"):
        return
    direct_register_custom_op("flas_steer", _flas_steer, mutates_args=["out"], fake_impl=_flas_steer_fake)


class PagedFlowAttention(nn.Module):
    """The flow's self-attention core for one (Euler step, block): paged, full (no window)."""

    def __init__(self, g: FlowGeometry, scale: float, kv_dtype: torch.dtype, cache_config, prefix: str):
        super().__init__()
        self.kv_dtype = kv_dtype
        self.attn = Attention(
            g.num_heads,
            g.head_dim,
            scale,
            num_kv_heads=g.num_kv_heads,
            cache_config=cache_config,
            logits_soft_cap=g.attn_logit_softcapping,
            per_layer_sliding_window=None,
            prefix=f"{prefix}.attn",
        )
        check_flow_kv_dtype(self.attn)  # kept in the model dtype under fp8 KV (checks.keep_flow_kv_unquantized)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        out = self.attn(q.to(self.kv_dtype), k.to(self.kv_dtype), v.to(self.kv_dtype))
        return out.to(dtype)


class FlasSteer(nn.Module):
    """The flow, its paged self-attention layers and per-step state, for one vLLM text decoder."""

    def __init__(self, text_model: nn.Module, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            raise NotImplementedError(
                "flas-vllm supports tensor_parallel_size=1 and pipeline_parallel_size=1; "
                "scale out with data parallel replicas (one engine per GPU) instead"
            )
        config = vllm_config.model_config.hf_config  # the top-level config: it carries `flas`
        model_dtype = vllm_config.model_config.dtype
        check_runner(vllm_config)  # a runner without the FLAS hook would steer nothing, silently
        self.flas_options = FlasEngineOptions.from_hf_config(config)
        ckpt = load_checkpoint(self.flas_options.checkpoint, config)
        check_fingerprint(config, ckpt.fingerprint)  # the checkpoint the compile-cache key was made for
        self.checkpoint = ckpt
        geometry = FlowGeometry.from_base_config(config)
        self.layer = ckpt.config.layer
        # a request's default Euler steps, and the most any request may ask for (one KV layer set each)
        self.n_steps, self.max_n_steps = self.flas_options.step_limits(ckpt.config.n_steps)
        num_blocks = ckpt.config.num_blocks
        device = text_model.embed_tokens.weight.device
        if ckpt.dtype != model_dtype:
            logger.warning(
                "FLAS flow dtype %s differs from the model dtype %s: the flow runs in %s, "
                "its paged self-attention KV is stored in %s", ckpt.dtype, model_dtype, ckpt.dtype, model_dtype,
            )
        self.flow = ckpt.build_flow(geometry, device, load=False)  # weights: in load_flow_weights
        use_engine_linears(self.flow, current_platform.is_cpu())  # before vLLM records the module tree for weight reloads
        # read by position; dummy runs (profiling, warm-up) may use positions up to their token count
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.flow.rope.build(max(vllm_config.model_config.max_model_len, max_tokens), ckpt.dtype, device)

        steps: dict[str, PagedFlowAttention] = {}
        if not ckpt.config.disable_self_attn:
            for idx in flow_layer_indices(geometry.num_hidden_layers, self.max_n_steps, num_blocks):
                steps[str(idx)] = PagedFlowAttention(
                    geometry, self.flow.self_attn_scale, model_dtype, vllm_config.cache_config,
                    prefix=f"{prefix}.flas_steps.{idx}",
                )
        self.steps = nn.ModuleDict(steps)
        cores = list(self.steps.values())
        self._cores = [[cores[k * num_blocks + b] if cores else None for b in range(num_blocks)]
                       for k in range(self.max_n_steps)]
        self.attention = SteeredAttention([core.attn for core in cores])  # narrowed per flow call where it can be
        # the engine step's per-token steering (step_state.py): built by the runtime, read here and by the table
        self.state = StepState.allocate(vllm_config.scheduler_config.max_num_batched_tokens, ckpt.dtype, device)
        self.step_buffers = self.state.buffers  # registered here, so its buffers follow the module
        self.time_table = self.state.times = TimeTable(  # a row per step size in flight (time_table.py)
            time_table_rows(vllm_config.scheduler_config), self.max_n_steps, geometry.hidden_size, ckpt.dtype, device)
        concept_len = inference_concept_len(ckpt.config.concept_max_len)
        self.table = SlotTableKV(
            geometry, num_blocks, self.flas_options.max_concepts + self.flas_options.max_pinned,
            concept_len, ckpt.dtype, device, state=self.state, flex_name=f"{prefix}.flas.concept_attention",
            concept_attention=getattr(config, CONCEPT_ATTENTION_ATTR, None),  # the front end's, in the cache key
        )
        if self.table.flex is not None:  # its traced op finds this engine's by name (concept_attention.flex_by_handle)
            vllm_config.compilation_config.static_forward_context[self.table.flex.handle] = self.table.flex
        mc = vllm_config.model_config
        self._hf_config = config
        # a checkpoint's own concept encoder: a submodule, so its weights are part of the model's state
        # (loaded in load_weights, restored by vLLM's reloads and by sleep level 2 like any other weight)
        self.own_encoder = None if ckpt.concept_encoder is None else build_own_encoder(
            text_config(config), ckpt.concept_encoder, ckpt.dtype, device)
        self.runtime = FlasRuntime(
            text_model, self.flas_options, self.flow, (self.n_steps, self.max_n_steps), concept_len,
            self.table, self.state, tokenizer_name=mc.tokenizer,
            tokenizer_kwargs={"revision": mc.tokenizer_revision, "trust_remote_code": mc.trust_remote_code},
            own_encoder=self.own_encoder,
        )
        # Without CUDA graphs (CPU, enforce_eager) and between PIECEWISE graph pieces the flow runs as an
        # opaque op that skips all flow work in steps where no token is steered and runs only the steered
        # tokens otherwise. FULL graphs cannot branch on data: there the flow stays in the graph on every
        # token and torch.where keeps unsteered tokens untouched, or (flow_graphs="bucketed") the op is
        # captured once per steered bucket (graph_modes.py, graph_buckets.py).
        cc = vllm_config.compilation_config
        opts = self.flas_options
        self.skip_unsteered = flow_runs_as_op(cc, opts.graph_path, opts.flow_graphs)
        self.bucketed = opts.flow_graphs == "bucketed"
        self.forced_graph_rows = self.bucketed and opts.graph_path  # every step as a bucketed FULL graph runs it
        self.op_split = op_runs_between_pieces(cc, opts.flow_graphs)
        # outside a compiled graph and any capture, steered rows go straight into the layer's outputs (flow_rows.py)
        self.eager_in_place = self.skip_unsteered and not self.forced_graph_rows and captures_no_graphs(cc)
        self.target = f"{prefix}.flas"
        if self.skip_unsteered:
            register_steer_op()
            cc.static_forward_context[self.target] = self  # found by name
            self.runtime.group_by_length = True
            self.runtime.flow_path = "bucketed" if self.bucketed else "skip"
        self.state.graph_rows_wanted = self.bucketed
        if self.bucketed:
            self.state.plan_rows_lazily()  # a replayed FULL graph needs no skip-path plan
        logger.info(
            "FLAS: %s base, checkpoint %s (fingerprint %s), layer %d, %d block(s), n_steps %d (max %d), "
            "%d concept slots, %d extra KV layers", geometry.model_type, ckpt.path, ckpt.fingerprint, self.layer,
            num_blocks, self.n_steps, self.max_n_steps, self.flas_options.max_concepts, len(steps),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor):
        """Replace the residual stream (hidden + residual) of steered tokens with the flow's output.

        Every registered family's decoder layer returns (hidden, residual) and the next layer's
        (or the final) norm adds them first, so that sum is the residual stream after layer L:
        a steered token continues as (0, flow output), any other as (hidden, residual), untouched.
        """
        if self.eager_in_place and not torch.compiler.is_compiling():
            if steer_in_place(self.state, self.steer_into, positions, hidden, residual):
                return hidden, residual  # the steered rows written into the layer's outputs (flow_rows.py)
        stream = residual_stream(hidden, residual)
        if self.skip_unsteered:
            flowed = torch.empty_like(stream)
            torch.ops.vllm.flas_steer(stream, positions, flowed, self.target)
        else:
            flowed = self._integrate(positions, stream, self.max_n_steps)
        steered = self.state.buffers.steered[: hidden.shape[0], None]
        return torch.where(steered, torch.zeros_like(hidden), hidden), torch.where(steered, flowed, residual)

    def steer_into(self, positions, stream, out) -> None:
        """Inside the opaque op: the flow on the rows a captured graph holds, or (eager) on the step's steered tokens."""
        state = self.state
        n_rows, forced = self._graph_flow_rows(stream.shape[0])
        if n_rows is not None:
            # What a FULL graph keyed by its steered bucket runs: the first n_rows of the graph row order,
            # persistent buffers only, no look at the step's data (graph_buckets.py).
            if state.profiling:  # a dummy batch or a capture
                self.runtime.profile_flow_rows += n_rows
            elif forced and n_rows:  # a real step run as its graph would (CPU tests); replays count at dispatch
                self.runtime.count_flow_rows(state.steered_rows, n_rows)
            if n_rows:
                integrate_graph_rows(self.flow, self.table, self._cores, state, positions, stream, self.max_n_steps,
                                     n_rows, out)
            return
        if not state.any_steered:  # a host-side fact of the step: no device sync
            return  # no row is selected; unsteered requests never read flow KV
        state.plan_steered_rows()  # bucketed engines plan them only for steps that run this path
        if state.profiling:  # a dummy batch: every token is steered (counted for the memory-profiling test)
            self.runtime.profile_flow_rows += stream.shape[0]
        else:
            self.runtime.count_flow_rows(state.steered_rows, stream.shape[0] if state.rows is None else
                                         state.rows.shape[0])
        # Only the steered rows (flow_rows.py), and only as many Euler steps as they need: a request
        # never reads the flow KV of Euler steps beyond its own. Each concept gather serves every Euler step;
        # the flow's paged attention covers the steered requests alone where the backend allows it.
        with self.table.gathers_reused(), self.attention.narrowed(state) as narrowed:
            integrate_rows(self.flow, self.table, self._cores, state, positions, stream, state.max_euler_steps,
                           state.rows, out, narrowed=narrowed)
        if self.attention.layers and not state.profiling:
            self.runtime.flow_attention_tokens += state.steered_rows if narrowed else stream.shape[0]

    def _graph_flow_rows(self, n: int) -> tuple[int | None, bool]:
        """The flow rows of the CUDA graph this call is captured into (graph_modes.captured_flow_rows), or
        with the forced graph path the step's bucket (then True: a real step, not a capture); None: no
        graph, run eagerly."""
        context = get_forward_context()
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        rows = captured_flow_rows(getattr(context, "cudagraph_runtime_mode", None), context.batch_descriptor, n,
                                  op_split=self.op_split, capturing=capturing, capture_rows=self.runtime.capture_rows)
        if rows is None and self.forced_graph_rows:
            return self.runtime.graph_flow_rows(n), True
        return rows, False

    def _integrate(self, positions, stream, euler_steps: int) -> torch.Tensor:
        """Every token's stream after the flow, in the model dtype (only steered rows are used)."""
        return integrate_rows(self.flow, self.table, self._cores, self.state, positions, stream, euler_steps, None)

    def load_flow_weights(self) -> set[str]:
        """Load the flow (and a checkpoint's own concept encoder) through each parameter's weight loader.

        The first load uses the tensors read at start-up; every later one (vLLM's `reload_weights`,
        waking from sleep level 2) reads the checkpoint file again, so a file replaced in place
        brings its new weights. Concepts in the slot table are encoded again before the next step.
        Returns the parameter names loaded (relative to this module).
        """
        ckpt = self.checkpoint
        if ckpt.tensors:
            tensors, encoder = ckpt.tensors, ckpt.concept_encoder
            ckpt.tensors, ckpt.concept_encoder = {}, None  # the modules own the weights now
        else:
            fresh = load_checkpoint(self.flas_options.checkpoint, self._hf_config)
            tensors, encoder = fresh.tensors, fresh.concept_encoder
            if (encoder is None) != (self.own_encoder is None):
                raise FlasCheckpointError(
                    f"flas checkpoint {fresh.path}: reloaded with{'out' if encoder is None else ''} a concept "
                    f"encoder ('concept_enc'), but the engine started with{'' if encoder is None else 'out'} one; "
                    "restart the engine to change it")
        loaded = _load_params(self.flow, tensors, "flow")
        if self.own_encoder is not None:
            loaded |= _load_params(self.own_encoder, encoder, "own_encoder")
        prepare_engine_linears(self.flow)
        self.runtime.weights_loaded()
        return loaded


def _load_params(module: nn.Module, tensors, prefix: str) -> set[str]:
    """Each parameter through its weight loader (vLLM wraps these while it reloads weights in place)."""
    names = [name for name, _ in module.named_parameters()]  # a layer's last load re-registers its parameters
    with torch.no_grad():
        for name in names:
            param = module.get_parameter(name)
            getattr(param, "weight_loader", default_weight_loader)(param, tensors[name].to(param.dtype))
    return {f"{prefix}.{name}" for name in names}


def _steer_layer(layer: nn.Module, steer: FlasSteer) -> None:
    """Hand decoder layer L's output (hidden, residual) to the flow.

    A forward hook, so the layer keeps vLLM's own class and every weight name (vLLM loads weights by
    module path); the flow registers under it as `layers.L.flas`. The concept encoder calls
    `layer.forward` directly, which runs no hook: layers 0-1 are never steered there.
    """
    layer.flas = steer
    layer.register_forward_hook(_flow_after_layer, with_kwargs=True)


def _flow_after_layer(layer: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    hidden, residual = output
    positions = args[0] if args else kwargs["positions"]
    return layer.flas(positions, hidden, residual)


class FlasCausalLMMixin:
    """What every FLAS architecture adds to its vLLM base class (see `steered_class`)."""

    flas_text_model_path: tuple[str, ...] = ("model",)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        text_model = self
        for attr in self.flas_text_model_path:
            text_model = getattr(text_model, attr)
        text_prefix = ".".join(p for p in (prefix, *self.flas_text_model_path) if p)
        steer = FlasSteer(text_model, vllm_config, text_prefix)
        n = len(text_model.layers)
        if not 0 <= steer.layer < n:  # the checkpoint check already refused this; guard the wiring
            raise ValueError(f"FLAS layer {steer.layer} is not a decoder layer of this model ({n} layers)")
        _steer_layer(text_model.layers[steer.layer], steer)
        self.flas_steer_prefix = f"{'.'.join(self.flas_text_model_path)}.layers.{steer.layer}.flas"
        object.__setattr__(self, "_flas", steer)  # not a second registration of the same module
        text_model.flas_runtime = steer.runtime

    def get_model_state_cls(self) -> type:
        """Model Runner V2's per-model extension point: steering rows per request (model_state.py)."""
        from flas_vllm.engine.model_state import FlasModelState  # lazy: vLLM's V2 model runner, imported only when it runs

        return FlasModelState

    # V1 runner: called by patches/runner_hook.py before each forward.
    def flas_prepare_step(self, req_ids, num_scheduled_tokens, requests) -> None:
        self._flas.runtime.prepare_step(req_ids, num_scheduled_tokens, requests)

    # V1 runner: called by patches/runner_hook.py when the runner drops a finished or aborted request.
    def flas_request_finished(self, req_id: str) -> None:
        self._flas.runtime.finish(req_id)

    # Both runners: patches/dummy_runs.py runs vLLM's dummy batches (memory profiling, warm-up) inside it.
    def flas_profiling(self):
        return self._flas.runtime.profiling()

    @property
    def flas_runtime(self) -> FlasRuntime:
        return self._flas.runtime

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return loaded | {f"{self.flas_steer_prefix}.{n}" for n in self._flas.load_flow_weights()}


# One steered class per family, over the vLLM class that `flas_vllm.core.families` names for it (the
# registry's architecture names are the single source; the plugin registers each under its name;
# tests/test_layout.py checks that each is defined here, at module level, over the right base).
# Gemma-3's multimodal class lives in model_multimodal.py: its vLLM base needs torchvision.


class FlasGemma2ForCausalLM(FlasCausalLMMixin, Gemma2ForCausalLM):
    """Gemma-2 steered by FLAS."""


class FlasGemma3ForCausalLM(FlasCausalLMMixin, Gemma3ForCausalLM):
    """Gemma-3 (text-only checkpoints) steered by FLAS."""


class FlasQwen3ForCausalLM(FlasCausalLMMixin, Qwen3ForCausalLM):
    """Qwen3 steered by FLAS."""


class FlasLlamaForCausalLM(FlasCausalLMMixin, LlamaForCausalLM):
    """Llama-3.1 steered by FLAS."""
