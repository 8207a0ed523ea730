"""The flow's linear layers as the engine runs them: the platform's GEMM, and q/k/v and gate/up fused.

The flow keeps one `nn.Linear` per projection, named as released checkpoints name them, so
training, the transformers path and checkpoint files are untouched. The engine runs them as
vLLM runs its own layers:
- on CPU through vLLM's unquantized GEMM dispatch (oneDNN), as `PlatformLinear`;
- the self-attention's q/k/v as one GEMM and the MLP's gate/up as one (`FusedLinear`), as vLLM's
  `QKVParallelLinear` / `MergedColumnParallelLinear` do. The fused weight is the only storage:
  the separate parameters become views of it, so each weight loader (and vLLM's in-place
  reloads, which copy into the parameters) writes straight into the fused GEMM's weight.

A fused GEMM's columns equal the separate GEMMs' bit for bit on CPU (oneDNN: per output column the
same reduction over the input), which keeps the fp32 parity with the transformers path exact
(tests/test_flow_linears.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flas_vllm.core.flow import FlowFunction


class PlatformLinear(nn.Module):
    """Stands in for one of the flow's nn.Linear: the same parameters under the same names, its matmul
    the one vLLM uses for its own unquantized layers on this platform (see `use_platform_gemm`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.cpu_linear = None  # set by `dispatch` once the weights are loaded
        self.fused = False  # run only as part of a FusedLinear: no matmul of its own is built

    def dispatch(self) -> None:
        """Build the platform's matmul for the current weights (oneDNN prepares them): after every load."""
        dispatch_gemm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


def dispatch_gemm(layer: nn.Module) -> None:
    """vLLM's CPU GEMM for `layer.weight` / `layer.bias` (sets `layer.cpu_linear`)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm  # lazy: a CPU-only vLLM helper, reached only on CPU

    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


class FusedLinear(nn.Module):
    """Linears of one input as one GEMM; returns each part's output (views of the fused output).

    Holds the fused weight (and bias) as plain tensor attributes, neither parameters nor buffers: no
    checkpoint name changes, and vLLM's layerwise reloads (which move a layer's parameters and buffers
    to the meta device while they load it) never touch them. The parts' parameters are views of them
    (`bind`), so what a reload copies into a part lands here.
    """

    def __init__(self, parts: list[nn.Module], platform_gemm: bool):
        super().__init__()
        self.platform_gemm = platform_gemm  # vLLM's CPU GEMM (see `use_engine_linears`), else torch's linear
        first = parts[0].weight
        self.sizes = [p.weight.shape[0] for p in parts]
        self.weight = first.detach().new_empty(sum(self.sizes), first.shape[1])
        has_bias = parts[0].bias is not None
        self.bias = first.detach().new_empty(sum(self.sizes)) if has_bias else None
        self.parts = tuple(parts)  # a tuple: not registered again as submodules
        self.cpu_linear = None
        for p in parts:
            if isinstance(p, PlatformLinear):
                p.fused = True
        self.bind()

    def bind(self) -> None:
        """Make each part's parameters views of the fused tensors, copying in what they hold now.

        Idempotent; needed again only if something replaced a part's parameter object.
        """
        start = 0
        for part, n in zip(self.parts, self.sizes):
            for name, fused in (("weight", self.weight), ("bias", self.bias)):
                param = getattr(part, name)
                if param is None:
                    continue
                view = fused[start: start + n]
                if not _aliases(param, view):
                    view.copy_(param.data)
                    param.data = view
            start += n

    def dispatch(self) -> None:
        """After every load: the parts' views are bound, and the CPU GEMM prepared for the new weights."""
        self.bind()
        if self.platform_gemm:
            dispatch_gemm(self)
            self.bind()  # vLLM's small-GEMM kernel keeps its bias in float32, in new storage: the parts follow it

    def _apply(self, fn, recurse=True):
        """`.to()` and friends move the fused tensors too (they are neither parameters nor buffers), then the
        parts, which their own modules moved first (they are registered before this module), are bound again."""
        self.weight = fn(self.weight)
        self.bias = None if self.bias is None else fn(self.bias)
        self.bind()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gemm = self.cpu_linear if self.cpu_linear is not None else F.linear
        return gemm(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _aliases(param: torch.Tensor, view: torch.Tensor) -> bool:
    """Same storage at the same offset (storage identity, so it holds on the meta device too)."""
    return (param.untyped_storage()._cdata == view.untyped_storage()._cdata
            and param.storage_offset() == view.storage_offset())


def use_engine_linears(flow: FlowFunction, platform_gemm: bool) -> None:
    """Swap in the platform's GEMMs and the fused projections, before vLLM records the module tree.

    `platform_gemm` (the engine passes: on CPU): each nn.Linear becomes a `PlatformLinear`. torch's
    default CPU linear (MKL) picks different kernels for different row counts (M=1 vs M>1 already
    differs in the last bits), so a steered request's output would depend on what else is in its
    batch; vLLM's own layers go through oneDNN, whose per-row results do not depend on M, so fp32
    mixed batches stay bit-identical to solo runs. Other platforms keep torch's linear.
    `prepare_engine_linears` builds the matmuls after each load. Imports nothing from vLLM here,
    so torch-only benchmarks (benchmarks/gpu_ceiling.py) run the engine's linears too.
    """
    if platform_gemm:
        use_platform_gemm(flow)
    for block in flow.blocks:
        if block.has_self:
            a = block.self_attn
            a.qkv_proj = FusedLinear([a.q_proj, a.k_proj, a.v_proj], platform_gemm)
        if block.has_mlp:
            block.gate_up_proj = FusedLinear([block.gate_proj, block.up_proj], platform_gemm)


def use_platform_gemm(flow: nn.Module) -> None:
    """Each of the flow's nn.Linear as a `PlatformLinear` (vLLM's CPU GEMM), nothing fused."""
    for parent in list(flow.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PlatformLinear(child))


def prepare_engine_linears(flow: FlowFunction) -> None:
    """After every weight load: bind the fused projections and build the platform's matmuls."""
    for module in flow.modules():
        if isinstance(module, FusedLinear) or (isinstance(module, PlatformLinear) and not module.fused):
            module.dispatch()
