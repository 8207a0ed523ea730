"""Shared fixtures: one tiny Gemma-2 and cached random FLAS checkpoints for the whole session.

Nothing here touches ../shared or a model hub: everything is built at run time
(and cached under $FLAS_VLLM_CACHE, default ~/.cache/flas-vllm).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from flas_vllm.fixtures.tiny_gemma2 import ensure_tiny_gemma2

    return ensure_tiny_gemma2()


@pytest.fixture(scope="session")
def make_ckpt(tiny_model):
    """make_ckpt(num_blocks=2, fmt="pt", dtype="bfloat16", ...) -> cached checkpoint directory."""
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint

    def make(**variant):
        return ensure_flas_checkpoint(tiny_model, **variant)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster, and far faster on a loaded 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
