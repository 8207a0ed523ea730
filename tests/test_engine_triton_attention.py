"""FLAS in a whole engine on vLLM's Triton attention backend, a GPU default, on CPU (slow: `-m engine`).

`tests/interpreted_engine_run.py` runs the engine in a subprocess where Triton's interpreter executes vLLM's
Triton kernels and the CPU platform's attention choice is TRITON_ATTN: the backend, its metadata builder,
KV-cache write and kernels are vLLM's (Model Runner V1), and the flow's paged attention is narrowed to the
steered requests by `narrow_varlen_gpu_metadata`, as on a GPU. Checked: the flow's attention covered the
steered tokens only; a mixed batch equals each request alone and the same batch with the flow's attention
over whole steps; every request equals the transformers path. Run by the interpreter, not a GPU: float32, and
no CUDA graphs.
"""

from __future__ import annotations

import pytest

from tests.interpreted_engine_run import run_engines
from tests.test_engine import assert_matches_hf, hf_steerer, prompt_ids
from tests.test_engine_v2 import COMMON, LOGPROB_ATOL, REQS as ALL_REQS, _deviation, _result

pytestmark = pytest.mark.engine

# Triton's interpreter runs each kernel program by program (about 0.2 s per launch here): three short requests,
# a few tokens, one flow block, so that each step is seconds. An unsteered request, two concepts, and a request
# with its own number of Euler steps.
REQS = [r for r in ALL_REQS if r.name in ("unsteered-short", "love-2.5", "ocean-1.5-N2")]
MAX_TOKENS = 4
ENGINE = dict(COMMON, max_n_steps=3)


@pytest.fixture(scope="module")
def triton_run(tiny_model, make_ckpt, tmp_path_factory):
    spec = {"model": str(tiny_model), "checkpoint": str(make_ckpt(num_blocks=1)), "max_tokens": MAX_TOKENS,
            "attention_backend": "TRITON_ATTN", "engines": {"eager": ENGINE},
            "requests": [{"name": r.name, "prompt_token_ids": prompt_ids(tiny_model, r.text),
                          "extra_args": r.extra_args()} for r in REQS]}
    out, _ = run_engines(spec, tmp_path_factory.mktemp("triton"))
    run = out["eager"]
    run["solo"] = {k: _result(v) for k, v in run["solo"].items()}
    for key in ("mixed", "mixed_whole_step"):
        run[key] = [_result(v) for v in run[key]]
    return run


def test_every_attention_layer_runs_vllms_triton_backend(triton_run):
    assert triton_run["attention_backends"] == ["TritonAttentionBackend"]  # the base model's and the flow's


def test_the_flows_attention_covers_the_steered_tokens_only(triton_run):
    """The stats count cumulatively: solo and mixed runs narrowed, then the mixed batch again over whole steps."""
    narrowed, whole = triton_run["stats"], triton_run["stats_whole_step"]
    assert narrowed["steered_tokens"] > 0
    assert narrowed["flow_attention_tokens"] == narrowed["steered_tokens"]  # every flow call narrowed
    steered = whole["steered_tokens"] - narrowed["steered_tokens"]
    assert 0 < steered < whole["flow_attention_tokens"] - narrowed["flow_attention_tokens"]  # unsteered ones too


def test_mixed_batch_equals_solo_and_the_whole_step_attention(triton_run):
    solo = triton_run["solo"]
    for req, res, res_whole in zip(REQS + REQS, triton_run["mixed"], triton_run["mixed_whole_step"]):
        assert _deviation(res, solo[req.name], f"{req.name}: mixed vs solo") <= LOGPROB_ATOL, req.name
        assert _deviation(res, res_whole, f"{req.name}: narrowed vs whole step") <= LOGPROB_ATOL, req.name


def test_steered_and_unsteered_match_transformers(triton_run, tiny_model, make_ckpt):
    steerer = hf_steerer(tiny_model, make_ckpt(num_blocks=1))
    for req in REQS:
        ref = steerer.generate([prompt_ids(tiny_model, req.text)], req.concept or "unused", req.flowtime or 0.0,
                               max_new_tokens=MAX_TOKENS, ignore_eos=True, n_steps=req.n_steps)[0]
        assert_matches_hf(triton_run["solo"][req.name], ref, f"{req.name} (Triton attention backend)",
                          min_tokens=MAX_TOKENS)
