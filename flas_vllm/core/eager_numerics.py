"""A compiled flow computes what the eager flow computes, bit for bit.

FLAS's flow is specified (and was trained) as eager PyTorch runs it: every bf16
op's result rounded to bf16 (spec sections 2 and 3). A compiler changes that in
two ways, and vLLM compiles the model with Inductor on GPUs (and on CPU by default):

- Inductor computes a fused chain of bf16 ops in float32 and rounds once at the
  end (unless `emulate_precision_casts` is set, which would change the base model
  and so vanilla traffic too). `rounded` restores each rounding in the flow only:
  the identity in eager code, where the value is already rounded; while compiling,
  a round-to-nearest-even done with integer bit operations that no compiler may drop.
- Inductor generates its own reductions, which sum in another order than eager
  kernels do. `mean_square` (the RMSNorm statistic) is an opaque op while compiling,
  so the eager kernels compute it in both.

The flow's cos/sin tables are the third source of difference; `core.rope.RopeTable`
builds them eagerly, once.
"""

from __future__ import annotations

import torch

_BF16_DROPPED_BITS = 16


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest bf16 value (ties to even), still float32: what `.to(bfloat16)` rounds to."""
    bits = x.view(torch.int32)  # same element size: a view of any layout
    lsb = (bits >> _BF16_DROPPED_BITS) & 1
    bits = (bits + (0x7FFF + lsb)) & -(1 << _BF16_DROPPED_BITS)
    return torch.where(torch.isnan(x), x, bits.view(torch.float32))  # a NaN stays a NaN


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as eager code leaves it: rounded to its own dtype (made explicit for bf16 while compiling)."""
    if x.dtype != torch.bfloat16 or not torch.compiler.is_compiling():
        return x
    return round_to_bf16(x.float()).to(torch.bfloat16)


def _mean_square_eager(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1, keepdim=True)


@torch.library.custom_op("flas::mean_square", mutates_args=())
def _mean_square_op(x: torch.Tensor) -> torch.Tensor:
    return _mean_square_eager(x)


@_mean_square_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """float32 mean of x**2 over the last dim (keepdim), by the eager kernels also while compiling."""
    if torch.compiler.is_compiling():
        return _mean_square_op(x)
    return _mean_square_eager(x)
