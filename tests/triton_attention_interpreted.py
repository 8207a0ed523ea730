"""vLLM's own Triton attention backend with the flow's metadata narrowed to the steered requests
(engine/steered_attention.py): its forward, its KV-cache write and the Triton kernels they launch, run by
Triton's interpreter on CPU. `python tests/triton_attention_interpreted.py` (test_steered_attention_gpu.py runs
it in a process of its own: the interpreter must be on before Triton is first imported).

What a GPU would run, bar the compiler: the kernels' code, launch grids, 2D/3D choice and masks are vLLM's;
the interpreter executes each program instance with numpy. float32 (numpy has no bf16). Not run on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_interpreter import use_triton_interpreter  # before anything imports Triton

    use_triton_interpreter()
    import pytest

    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", __file__]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from vllm.v1.attention.backends import triton_attn  # noqa: E402

from flas_vllm.engine.steered_attention import narrow_varlen_gpu_metadata  # noqa: E402
from tests.test_steered_attention_gpu import (BLOCK, HEAD_DIM, HEADS, KV_HEADS, QUERY_LENS, SCALE,  # noqa: E402
                                              SEQ_LENS, SOFTCAP, STEERED, _rows, _steered, _tensors, _triton,
                                              paged_varlen_attention)


@pytest.fixture(scope="module")
def backend():
    import triton  # the interpreter's: vLLM must have bound its kernels to it, not to placeholders

    assert triton.knobs.runtime.interpret and triton_attn.unified_attention.__module__.startswith("vllm")
    with pytest.MonkeyPatch.context() as mp:  # the one GPU query on the path: a tile-size heuristic (Hopper's)
        mp.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        yield triton_attn.TritonAttentionImpl(HEADS, HEAD_DIM, SCALE, KV_HEADS, None, None, "auto",
                                              logits_soft_cap=SOFTCAP)


LAYOUTS = {  # query lens, context lengths, steered requests
    "prefill chunks and decodes": (QUERY_LENS, SEQ_LENS, STEERED),
    # 10 decodes run vLLM's 2D kernel; the 3 steered ones alone, under the 3D threshold, its split-softmax one
    "decodes": (np.ones(10, dtype=np.int64), np.array([5, 90, 17, 33, 64, 2, 48, 71, 20, 9]), np.array([1, 4, 8])),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vllm_triton_backend_gives_the_steered_requests_what_the_whole_step_gives_them(backend, layout):
    query_lens, seq_lens, steered = LAYOUTS[layout]
    whole = _triton("cpu", query_lens, seq_lens, threshold_3d=4)
    _, num_blocks = _tensors("cpu", query_lens, seq_lens)
    small = narrow_varlen_gpu_metadata(whole, None, _steered(request_tokens=query_lens, requests=steered))
    rows = _rows(steered, query_lens)
    layer = SimpleNamespace(_k_scale=torch.ones(()), _v_scale=torch.ones(()), _q_scale=torch.ones(()))
    torch.manual_seed(2)
    cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)  # vLLM's layout: [blocks, nKV, BLOCK, K|V]
    n = int(query_lens.sum())
    q, k, v = torch.randn(n, HEADS, HEAD_DIM), torch.randn(n, KV_HEADS, HEAD_DIM), torch.randn(n, KV_HEADS, HEAD_DIM)

    def run(meta, tokens):
        kv = cache.clone()
        out = torch.zeros(len(tokens), HEADS, HEAD_DIM)
        meta.softmax_segm_max.fill_(float("nan"))  # written only by the 3D kernel
        backend.do_kv_cache_update(layer, k[tokens], v[tokens], kv, meta.slot_mapping)
        backend.forward(layer, q[tokens], k[tokens], v[tokens], kv, meta, out)
        return out, kv, not meta.softmax_segm_max.isnan().all()

    out_whole, kv_whole, whole_3d = run(whole, torch.arange(n))
    out_small, kv_small, small_3d = run(small, rows)
    assert not whole_3d and small_3d == (layout == "decodes")

    def by_slot(kv):
        return kv.transpose(1, 2).reshape(num_blocks * BLOCK, KV_HEADS, 2 * HEAD_DIM)

    written = torch.zeros(num_blocks * BLOCK, dtype=torch.bool)
    written[whole.slot_mapping[rows]] = True
    assert torch.equal(by_slot(kv_small)[written], by_slot(kv_whole)[written])  # the steered tokens' K/V
    assert torch.equal(by_slot(kv_small)[~written], by_slot(cache)[~written])  # nobody else's slot
    key_cache, value_cache = kv_whole.transpose(1, 2).split(HEAD_DIM, dim=-1)
    expected = paged_varlen_attention(q, key_cache, value_cache, whole)[rows]
    torch.testing.assert_close(out_whole[rows], expected, rtol=0, atol=2e-5)  # the kernels read it as the reference
    if layout == "decodes":  # another kernel (split softmax) for the narrowed call: the same up to its rounding
        torch.testing.assert_close(out_small, expected, rtol=0, atol=2e-5)
    else:  # the same kernel: per request, bit for bit
        assert torch.equal(out_small, out_whole[rows])
