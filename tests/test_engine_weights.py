"""Weights reloaded through vLLM's own API, and the flow's KV kept out of a quantized KV cache (slow: `-m engine`).

Issue 19, items 3 and 4. Two eager fp32 engines, one alive at a time:

- RELOAD: a safetensors checkpoint copied to a temporary directory, so the test can replace the
  file in place before vLLM's `reload_weights`.
- FP8: `kv_cache_dtype="fp8"` with a training `.pt` carrying its own concept encoder: the flow's
  paged self-attention layers keep the model dtype, the base model's are fp8, and a reload
  restores the own encoder's weights too.
"""

from __future__ import annotations

import shutil

import pytest

from flas_vllm.engine.llm import shutdown_engine
from tests.texts import MID, SHORT

pytestmark = pytest.mark.engine

KV_BYTES = 256 * 1024 * 1024
MAX_TOKENS = 12
CASES = [(SHORT, "love", 2.0), (MID, "the ocean and sailing ships", 4.0), (SHORT, None, None)]


def _engine(tiny_model, ckpt, **kw):
    from flas_vllm.engine.llm import FlasLLM

    return FlasLLM(str(tiny_model), str(ckpt), dtype="float32", enforce_eager=True,
                   kv_cache_memory_bytes=KV_BYTES, seed=0, max_concepts=4, **kw)


def _generate(llm, tiny_model):
    """Greedy (token ids, cumulative logprob) of each case, all in one batch."""
    from vllm import SamplingParams

    from flas_vllm.core.prompts import format_prompt
    from flas_vllm.core.steering import steering

    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": format_prompt(tok, text)} for text, _, _ in CASES]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                             extra_args=steering(c, t) if c else None) for _, c, t in CASES]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(tuple(o.outputs[0].token_ids), o.outputs[0].cumulative_logprob) for o in outs]


def _reload(llm):
    """vLLM's in-place weight reload (RL weight sync), then the prefix cache reset it leaves to its caller."""
    llm.collective_rpc("reload_weights")
    assert llm.reset_prefix_cache()


def _encoded(llm) -> int:
    return llm.collective_rpc("flas_stats")[0]["encoded"]


@pytest.fixture(scope="module")
def reload_engine(tiny_model, make_ckpt, tmp_path_factory):
    src = make_ckpt(num_blocks=2)
    ckpt = tmp_path_factory.mktemp("reload") / "ckpt"
    shutil.copytree(src, ckpt)
    llm = _engine(tiny_model, ckpt)
    yield llm, ckpt
    shutdown_engine(llm)


def test_reload_restores_the_same_steering(reload_engine, tiny_model):
    llm, _ = reload_engine
    before = _generate(llm, tiny_model)
    assert before[0][0] != before[2][0] and before[1][0] != before[2][0]  # steered differs from unsteered
    encoded = _encoded(llm)
    _reload(llm)  # used to raise: the first load emptied the checkpoint's tensors
    assert _generate(llm, tiny_model) == before
    # the concepts in the table were encoded again with the reloaded weights
    assert _encoded(llm) >= encoded + 2


def test_reload_reads_a_replaced_checkpoint_file(reload_engine, tiny_model, make_ckpt):
    llm, ckpt = reload_engine
    before = _generate(llm, tiny_model)
    (weights,) = ckpt.glob("*.safetensors")
    other = make_ckpt(num_blocks=2, seed=7)
    shutil.copyfile(next(other.glob("*.safetensors")), weights)  # same geometry, other weights
    _reload(llm)
    after = _generate(llm, tiny_model)
    assert after[2] == before[2]  # unsteered: the base model's weights are the same
    assert after[0][0] != before[0][0] and after[1][0] != before[1][0]  # the new flow steers otherwise
    # and equal to an engine started on the new file: the slot table holds no stale concept keys
    shutdown_engine(llm)
    fresh = _engine(tiny_model, ckpt)
    try:
        assert _generate(fresh, tiny_model) == after
    finally:
        shutdown_engine(fresh)


def test_fp8_kv_keeps_the_flow_in_the_model_dtype_and_reload_restores_the_own_encoder(tiny_model, make_ckpt):
    ckpt = make_ckpt(num_blocks=1, fmt="pt", seed=1, concept_encoder=True)
    llm = _engine(tiny_model, ckpt, kv_cache_dtype="fp8")
    try:
        dtypes = llm.collective_rpc("flas_kv_cache_dtypes")[0]
        flow = {n: d for n, d in dtypes.items() if ".flas_steps." in n}
        base = {n: d for n, d in dtypes.items() if ".flas_steps." not in n}
        assert flow and base
        assert all(list(d) == ["auto", "torch.float32"] for d in flow.values()), flow
        assert all(d[0] == "fp8" and d[1] != "torch.float32" for d in base.values()), base
        before = _generate(llm, tiny_model)
        assert before[0][0] != before[2][0]
        _reload(llm)  # the own encoder is a submodule: its weights come back with the rest
        assert _generate(llm, tiny_model) == before
    finally:
        shutdown_engine(llm)
