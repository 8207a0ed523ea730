"""The flow's attention narrowed to the steered requests on vLLM's FlashAttention and Triton backends
(engine/steered_attention.py), with the backends' own metadata classes on CPU tensors.

No GPU here. What is checked instead:
- vLLM's own Triton backend (its forward, KV-cache write and Triton kernels) runs the narrowed metadata under
  Triton's interpreter (`triton_attention_interpreted.py`, a process of its own): the steered requests get
  what the whole step gives them, and nobody else's KV slot is written. FlashAttention's CUDA kernels cannot
  run here;
- a plain-torch paged varlen attention that reads the metadata as those kernels do (each request's queries
  from `query_start_loc`, its context from `seq_lens` and its `block_table` row, causal from the end of the
  context, Gemma-2's softcap) gives the steered requests the same from the narrowed metadata as from the
  whole step's;
- the narrower reads nothing of the device's memory on the host (run on the meta device, where any such read
  raises), and stages nothing during the forward (the step's preparation staged its request indices), so a
  step between CUDA-graph pieces never waits for the GPU;
- what it cannot narrow it leaves whole.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

flash_attn = pytest.importorskip("vllm.v1.attention.backends.flash_attn")
triton_attn = pytest.importorskip("vllm.v1.attention.backends.triton_attn")

from flas_vllm.engine.steered_attention import (SteeredRequests, narrow_varlen_gpu_metadata,  # noqa: E402
                                                narrower_for)
from flas_vllm.engine.step_buffers import StepBuffers  # noqa: E402
from flas_vllm.engine.step_state import query_start  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16
QUERY_LENS = np.array([3, 1, 1, 2, 9])  # prefill chunks and decodes
SEQ_LENS = np.array([7, 70, 41, 33, 12])
STEERED = np.array([0, 2, 3])
SCALE, SOFTCAP = HEAD_DIM ** -0.5, 50.0


def _tensors(device="cpu", query_lens=QUERY_LENS, seq_lens=SEQ_LENS):
    torch.manual_seed(0)
    blocks_per_req = -(-seq_lens.max() // BLOCK)
    num_blocks = len(seq_lens) * blocks_per_req + 2
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    block_table = order[: len(seq_lens) * blocks_per_req].view(len(seq_lens), blocks_per_req).contiguous()
    slots = [int(block_table[r, p // BLOCK]) * BLOCK + p % BLOCK
             for r, (q, s) in enumerate(zip(query_lens, seq_lens)) for p in range(s - q, s)]
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.from_numpy(np.cumsum(query_lens))
    fields = dict(num_actual_tokens=int(query_lens.sum()), max_query_len=int(query_lens.max()),
                  query_start_loc=query_start_loc, max_seq_len=int(seq_lens.max()),
                  seq_lens=torch.from_numpy(seq_lens).to(torch.int32), block_table=block_table,
                  slot_mapping=torch.tensor(slots, dtype=torch.int64))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}, num_blocks


def _flash(device="cpu", **extra):
    fields, _ = _tensors(device)
    return flash_attn.FlashAttentionMetadata(**fields, scheduler_metadata=torch.zeros(3, device=device),
                                             max_num_splits=4, **extra)


def _triton(device="cpu", query_lens=QUERY_LENS, seq_lens=SEQ_LENS, threshold_3d=8, **extra):
    """With the scratch its builder allocates for the 3D (split-softmax) decode kernel."""
    fields, _ = _tensors(device, query_lens, seq_lens)
    segments = 16
    scratch = dict(softmax_segm_output=torch.empty(threshold_3d, HEADS, segments, HEAD_DIM, device=device),
                   softmax_segm_max=torch.empty(threshold_3d, HEADS, segments, device=device),
                   softmax_segm_expsum=torch.empty(threshold_3d, HEADS, segments, device=device))
    return triton_attn.TritonAttentionMetadata(**fields, seq_threshold_3D=threshold_3d,
                                               num_par_softmax_segments=segments, causal=True, **scratch, **extra)


BACKENDS = {"flash_attn": _flash, "triton_attn": _triton}


def _rows(requests, query_lens=QUERY_LENS) -> torch.Tensor:
    starts = np.concatenate([[0], np.cumsum(query_lens)])
    return torch.from_numpy(np.concatenate([np.arange(starts[r], starts[r + 1]) for r in requests]))


def _steered(device="cpu", request_tokens=QUERY_LENS, requests=STEERED) -> SteeredRequests:
    """As build_step stages them while the step is prepared (pinned host memory to the device on a GPU)."""
    staged = StepBuffers(64, torch.float32, device).stage_steered_requests(requests,
                                                                          query_start(request_tokens[requests]))
    return SteeredRequests(request_tokens, requests, _rows(requests, request_tokens).to(device), *staged)


def paged_varlen_attention(query, key_cache, value_cache, meta):
    """Plain torch, as the varlen paged kernels read their metadata: request r's queries are
    query[qsl[r]:qsl[r+1]], its context the first seq_lens[r] slots of its block_table row, the last query
    at the context's last position (causal), soft-capped logits. key_cache: [blocks, BLOCK, nKV, D]."""
    out = torch.zeros(meta.num_actual_tokens, HEADS, HEAD_DIM)
    qsl = meta.query_start_loc.tolist()
    for r in range(len(qsl) - 1):
        n, length = qsl[r + 1] - qsl[r], int(meta.seq_lens[r])
        slots = torch.arange(length)
        blocks = meta.block_table[r].long()[slots // BLOCK]
        k = key_cache[blocks, slots % BLOCK].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [L, nH, D]
        v = value_cache[blocks, slots % BLOCK].repeat_interleave(HEADS // KV_HEADS, dim=1)
        q = query[qsl[r]: qsl[r + 1]]
        logits = torch.einsum("qhd,khd->hqk", q, k) * SCALE
        logits = torch.tanh(logits / SOFTCAP) * SOFTCAP
        allowed = slots[None, :] <= (length - n + torch.arange(n))[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        out[qsl[r]: qsl[r + 1]] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_narrowed_metadata_gives_the_steered_requests_what_the_whole_step_gives_them(backend):
    whole = BACKENDS[backend]()
    rows = _rows(STEERED)
    small = narrow_varlen_gpu_metadata(whole, None, _steered())
    assert type(small) is type(whole) and small.num_actual_tokens == len(rows) == 6
    assert small.max_query_len == 3 and small.query_start_loc.tolist() == [0, 3, 4, 6]
    assert small.query_start_loc.dtype == torch.int32
    assert small.seq_lens.tolist() == SEQ_LENS[STEERED].tolist()
    assert torch.equal(small.block_table, whole.block_table[torch.from_numpy(STEERED)])
    assert torch.equal(small.slot_mapping, whole.slot_mapping[rows])  # the KV cache update writes these slots
    assert small.max_seq_len >= int(SEQ_LENS[STEERED].max())  # a bound: the kernels read each length
    assert small.scheduler_metadata is None  # the whole step's schedule does not fit the narrowed call
    _, num_blocks = _tensors()
    key_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    value_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    query = torch.randn(int(QUERY_LENS.sum()), HEADS, HEAD_DIM)
    expected = paged_varlen_attention(query, key_cache, value_cache, whole)[rows]
    got = paged_varlen_attention(query[rows], key_cache, value_cache, small)
    assert torch.equal(got, expected)
    alone = narrow_varlen_gpu_metadata(whole, None, _steered(requests=np.array([4])))  # the long prefill chunk
    got = paged_varlen_attention(query[_rows([4])], key_cache, value_cache, alone)
    assert torch.equal(got, paged_varlen_attention(query, key_cache, value_cache, whole)[_rows([4])])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_narrower_never_reads_device_memory_on_the_host(backend):
    """On the meta device any host read of a tensor's values (.item(), .tolist(), a copy to the CPU) raises:
    the narrower gathers on the device from indices it stages itself."""
    small = narrow_varlen_gpu_metadata(BACKENDS[backend]("meta"), None, _steered("meta"))
    assert small is not None and small.seq_lens.device.type == "meta" and small.query_start_loc.shape == (4,)
    assert small.num_actual_tokens == 6 and small.slot_mapping.shape == (6,)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_step_laid_out_otherwise_keeps_the_whole_step_attention(backend):
    whole = BACKENDS[backend]()
    assert narrow_varlen_gpu_metadata(whole, None, _steered(request_tokens=QUERY_LENS[:4])) is None
    padded = QUERY_LENS.copy()
    padded[-1] += 8  # a step padded for a graph: more tokens than the metadata's
    assert narrow_varlen_gpu_metadata(whole, None, _steered(request_tokens=padded)) is None


@pytest.mark.parametrize("feature", [
    dict(causal=torch.ones(5, dtype=torch.bool)),  # per-request causality
    dict(dcp_context_kv_lens=torch.zeros(5, dtype=torch.int32)),  # decode context parallelism
    dict(mm_prefix_query_range_tensor=torch.zeros(9, 2, dtype=torch.int32)),  # bidirectional image prefixes
    dict(rswa_prefix_lens=torch.zeros(5, dtype=torch.int32)),
])
def test_metadata_with_features_the_narrower_does_not_carry_stays_whole(feature):
    assert narrow_varlen_gpu_metadata(_flash(**feature), None, _steered()) is None


def test_the_gpu_backends_metadata_classes_have_the_narrower():
    assert narrower_for(_flash()) is narrow_varlen_gpu_metadata
    assert narrower_for(_triton()) is narrow_varlen_gpu_metadata
    assert narrower_for(SimpleNamespace()) is None



def test_vllm_triton_backend_runs_the_narrowed_metadata_as_the_whole_step():
    """vLLM's own Triton backend (its forward, its KV-cache write and the Triton kernels they launch) with the
    narrowed metadata, run by Triton's interpreter in a process of its own (`triton_attention_interpreted.py`:
    the interpreter must be on before Triton is first imported)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_attention_interpreted.py"))],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "2 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
