"""The one training loop of the test fixtures (the tiny base model and the toy flow).

A seeded batch order, AdamW with a linear warm-up then a cosine decay to a tenth,
gradient clipping at 1, right-padded batches: same seed, same weights.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

import torch

Example = TypeVar("Example")


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """LR multiplier: (step+1)/warmup while warming up, then cosine from 1 down to 0.1 at `steps`."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def right_padded(rows: Sequence[tuple[Sequence[int], int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, loss start) rows -> ids, valid mask (bool), labels (-100 before each loss start).

    Right padding keeps every row's positions at 0..len-1.
    """
    width = max(len(seq) for seq, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (seq, start) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(list(seq))
        valid[r, : len(seq)] = True
        labels[r, start: len(seq)] = ids[r, start: len(seq)]
    return ids, valid, labels


def train(module: torch.nn.Module, params: Sequence[torch.nn.Parameter], examples: Sequence[Example], *,
          seed: int, steps: int, batch_size: int, lr: float, warmup: int,
          loss_of: Callable[[list[Example], torch.Generator], torch.Tensor]) -> list[float]:
    """`steps` AdamW steps on `params` of `module` (in train mode meanwhile, eval mode after);
    `loss_of(batch, generator)` may draw from the same seeded generator."""
    params = list(params)
    module.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = loss_of(batch, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    module.eval()
    return losses
