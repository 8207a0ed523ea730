"""FlasGemma2ForCausalLM: vLLM's Gemma-2 with the FLAS flow after decoder layer L.

Every token of a steered request has its residual stream replaced by the
Euler-integrated flow of its own request; unsteered tokens pass through
`torch.where` untouched, so they are bit-identical to vanilla Gemma-2. The
flow's causal self-attention gets one paged vLLM `Attention` per (Euler step,
block), named `model.flas_steps.{num_hidden_layers + k*num_blocks + b}.attn`
(vLLM wants exactly one integer in a layer name).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM, Gemma2Model
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from flas_vllm.checkpoint import load_checkpoint
from flas_vllm.concept import inference_concept_len
from flas_vllm.concept_encoder import build_own_encoder
from flas_vllm.config import FlasEngineOptions, FlowGeometry
from flas_vllm.engine_checks import check_fingerprint, check_runner
from flas_vllm.flow import integrate
from flas_vllm.runtime import FlasRuntime, SlotTableKV, StepBuffers

logger = logging.getLogger(__name__)

# Models that take the eager "skip when nothing is steered" path, by key (one per process, normally).
_STEER_TARGETS: dict[str, "FlasGemma2Model"] = {}


def _flas_steer(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, target: str) -> None:
    """Opaque to the compiler, so it may look at the data: no steered token, no flow work at all."""
    _STEER_TARGETS[target]._steer_in_place(positions, hidden, residual)


def _flas_steer_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, target: str) -> None:
    return None


def _register_steer_op() -> None:
    if hasattr(torch.ops.vllm, "flas_steer"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("flas_steer", _flas_steer, mutates_args=["hidden", "residual"],
                              fake_impl=_flas_steer_fake)


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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        out = self.attn(q.to(self.kv_dtype), k.to(self.kv_dtype), v.to(self.kv_dtype))
        return out.to(dtype)


class FlasGemma2Model(Gemma2Model):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            raise NotImplementedError(
                "flas-vllm supports tensor_parallel_size=1 and pipeline_parallel_size=1; "
                "scale out with data parallel replicas (one engine per GPU) instead"
            )
        check_runner(vllm_config)  # a runner without the FLAS hook would steer nothing, silently
        config = vllm_config.model_config.hf_config
        model_dtype = vllm_config.model_config.dtype
        self.flas_options = FlasEngineOptions.from_hf_config(config)
        ckpt = load_checkpoint(self.flas_options.checkpoint, config)
        self.flas_checkpoint = ckpt
        check_fingerprint(config, ckpt.fingerprint)  # the checkpoint the compile-cache key was made for
        geometry = FlowGeometry.from_base_config(config)
        self.flas_layer = ckpt.config.layer
        # a request's default Euler steps, and the most any request may ask for (one KV layer set each)
        self.flas_n_steps, self.flas_max_n_steps = self.flas_options.step_limits(ckpt.config.n_steps)
        num_blocks = ckpt.config.num_blocks
        device = self.embed_tokens.weight.device
        if ckpt.dtype != model_dtype:
            logger.warning(
                "FLAS flow dtype %s differs from the model dtype %s: the flow runs in %s, "
                "its paged self-attention KV is stored in %s", ckpt.dtype, model_dtype, ckpt.dtype, model_dtype,
            )
        self.flas_flow = ckpt.build_flow(geometry, device, load=False)  # weights: in load_weights

        cache_config = vllm_config.cache_config
        steps: dict[str, PagedFlowAttention] = {}
        if not ckpt.config.disable_self_attn:
            for k in range(self.flas_max_n_steps):
                for b in range(num_blocks):
                    idx = config.num_hidden_layers + k * num_blocks + b
                    steps[str(idx)] = PagedFlowAttention(
                        geometry, self.flas_flow.self_attn_scale, model_dtype, cache_config,
                        prefix=f"{prefix}.flas_steps.{idx}",
                    )
        self.flas_steps = nn.ModuleDict(steps)
        cores = list(self.flas_steps.values())
        self._flas_cores = [
            [cores[k * num_blocks + b] if cores else None for b in range(num_blocks)]
            for k in range(self.flas_max_n_steps)
        ]
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.flas_buffers = StepBuffers(max_tokens, ckpt.dtype, device)
        concept_len = inference_concept_len(ckpt.config.concept_max_len)
        self.flas_table = SlotTableKV(
            geometry, num_blocks, self.flas_options.max_concepts + self.flas_options.max_pinned,
            concept_len, ckpt.dtype, device
        )
        self.flas_table.token_slots = self.flas_buffers.slot
        mc = vllm_config.model_config
        self.flas_runtime = FlasRuntime(
            self, self.flas_options, self.flas_flow, (self.flas_n_steps, self.flas_max_n_steps), concept_len,
            self.flas_table, self.flas_buffers, tokenizer_name=mc.tokenizer,
            tokenizer_kwargs={"revision": mc.tokenizer_revision, "trust_remote_code": mc.trust_remote_code},
            own_encoder=None if ckpt.concept_encoder is None else build_own_encoder(
                config, ckpt.concept_encoder, ckpt.dtype, device),
        )
        ckpt.concept_encoder = None  # the runtime's encoder owns those weights now
        # Without CUDA graphs (CPU, enforce_eager) the flow runs as an opaque op that skips all flow
        # work in steps where no token is steered. Captured graphs cannot branch on data, so there
        # the flow stays in the graph and torch.where keeps unsteered tokens untouched.
        from vllm.config import CUDAGraphMode

        mode = vllm_config.compilation_config.cudagraph_mode
        self._flas_skip_unsteered = (mode is None or mode == CUDAGraphMode.NONE) and not self.flas_options.graph_path
        self._flas_target = f"{prefix}@{id(self)}"
        if self._flas_skip_unsteered:
            _register_steer_op()
            _STEER_TARGETS[self._flas_target] = self
            self.flas_runtime.group_by_length = True
        logger.info(
            "FLAS: checkpoint %s (fingerprint %s), layer %d, %d block(s), n_steps %d (max %d), %d concept slots, "
            "%d extra KV layers", ckpt.path, ckpt.fingerprint, self.flas_layer, num_blocks, self.flas_n_steps,
            self.flas_max_n_steps,
            self.flas_options.max_concepts, len(steps),
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if inputs_embeds is not None:
            hidden_states = inputs_embeds
        else:
            hidden_states = self.embed_input_ids(input_ids)
        residual = None
        for idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer)):
            hidden_states, residual = layer(positions, hidden_states, residual)
            if idx == self.flas_layer:
                if self._flas_skip_unsteered:
                    torch.ops.vllm.flas_steer(hidden_states, residual, positions, self._flas_target)
                else:
                    hidden_states, residual = self._steer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _steer_in_place(self, positions, hidden, residual) -> None:
        runtime = self.flas_runtime
        if not runtime.any_steered:  # a host-side fact of the step: no device sync
            return  # unsteered requests never read their flow KV, so nothing needs writing
        # Only as many Euler steps as this step's steered tokens need: a request never reads
        # the flow KV of steps beyond its own n_steps.
        new_hidden, new_residual = self._steer(positions, hidden, residual, runtime.step_count)
        hidden.copy_(new_hidden)
        residual.copy_(new_residual)

    def _steer(self, positions, hidden, residual, n_steps: int | None = None):
        """Replace the residual stream (hidden + residual) of steered tokens with the flow's output."""
        n = hidden.shape[0]
        buffers = self.flas_buffers
        steered = buffers.steered[:n, None]
        stream = (hidden.float() + residual.float()).to(hidden.dtype)  # what the next fused add produces
        flow = self.flas_flow
        h = stream.to(flow.dtype)
        h = integrate(flow, h, buffers.dt[:n], n_steps or self.flas_max_n_steps, positions, self.flas_table,
                      self._flas_cores, token_steps=buffers.steps[:n])
        new_residual = torch.where(steered, h.to(hidden.dtype), residual)
        new_hidden = torch.where(steered, torch.zeros_like(hidden), hidden)
        return new_hidden, new_residual


class FlasGemma2ForCausalLM(Gemma2ForCausalLM):
    """Registered as an out-of-tree architecture; load it with a plain Gemma-2 model directory."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Build the inner model exactly once: Gemma2ForCausalLM.__init__ would register
        # a second set of Attention layers under the same names.
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = FlasGemma2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    # Called by patches/runner_hook.py before each forward.
    def flas_prepare_step(self, req_ids, num_scheduled_tokens, requests) -> None:
        self.model.flas_runtime.prepare_step(req_ids, num_scheduled_tokens, requests)

    # Called by patches/runner_hook.py when the runner drops a finished or aborted request.
    def flas_request_finished(self, req_id: str) -> None:
        self.model.flas_runtime.finish(req_id)

    @property
    def flas_runtime(self) -> FlasRuntime:
        return self.model.flas_runtime

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        flow = self.model.flas_flow
        tensors = self.model.flas_checkpoint.tensors
        with torch.no_grad():
            for name, param in flow.named_parameters():
                param.copy_(tensors[name].to(param.dtype))
        loaded |= {f"model.flas_flow.{name}" for name, _ in flow.named_parameters()}
        self.model.flas_checkpoint.tensors = {}  # the flow module owns the weights now
        _use_platform_gemm(flow)
        return loaded


class _PlatformLinear(nn.Linear):
    """nn.Linear whose matmul is the one vLLM uses for its own unquantized layers on this platform."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


def _use_platform_gemm(flow: nn.Module) -> None:
    """Run the flow's linear layers through vLLM's CPU GEMM dispatch (oneDNN), after weights are loaded.

    torch's default CPU linear (MKL) picks different kernels for different row
    counts (M=1 vs M>1 already differs in the last bits), so a steered
    request's output would depend on what else is in its batch. vLLM's own
    layers go through oneDNN, whose per-row results do not depend on M; using
    the same path keeps fp32 mixed batches bit-identical to solo runs, as
    they are for unsteered requests. Other platforms keep torch's linear.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in flow.modules():
        if type(module) is nn.Linear:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            module.__class__ = _PlatformLinear
