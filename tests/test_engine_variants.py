"""vLLM path == transformers path (HFSteerer, use_cache=True) across checkpoint variants (slow: `-m engine`).

One eager engine per variant, started and shut down in turn (pytest finishes
every test of one parametrized module fixture instance before building the
next). fp32 variants must match HF token for token with cumulative logprobs
within 1e-3; the bf16 variant (bf16 checkpoint on a bf16 model) may only
diverge at a step where HF's own top-1/top-2 margin is a near-tie, and is not
compared after such a divergence.
"""

from __future__ import annotations

import math
import time

import pytest

from flas_vllm.engine.llm import shutdown_engine
from tests.texts import LONG, LONG_CONCEPT, MID, SHORT

pytestmark = pytest.mark.engine

KV_BYTES = 256 * 1024 * 1024
MAX_TOKENS = 24
NEAR_TIE = 0.05  # bf16: a top-1/top-2 logprob margin below this may flip between implementations

# (text, concept, flowtime); flowtime 0 and None are unsteered
CASES = [
    (LONG, "love", 1.0),
    (MID, "love", 2.5),
    (SHORT, "love", 0.5),
    (LONG, LONG_CONCEPT, 1.5),
    (MID, LONG_CONCEPT, 4.0),
    (SHORT, "the ocean and sailing ships", 8.0),
    (LONG, "the ocean and sailing ships", 0.0),
    (MID, None, None),
]

# The MAIN engine of test_engine.py covers fp32 / num_blocks=2 / safetensors.
VARIANTS = {
    # a training .pt with its own concept encoder ('concept_enc'): one engine for all three, saves minutes
    "num_blocks=1,pt,concept_enc": dict(num_blocks=1, fmt="pt", seed=1, concept_encoder=True),
    # trained on a base model (alpaca prompts), no self-attention or MLP branch, concept_max_len 8 in config
    "disable_self_attn+mlp,alpaca": dict(num_blocks=2, disable_self_attn=True, disable_mlp=True,
                                         concept_max_len=8, prompt_format="alpaca"),
    "bf16": dict(num_blocks=2, dtype="bfloat16"),
}
TIMINGS: dict[str, float] = {}


def _ids(tok, text):
    from flas_vllm.core.prompts import format_prompt

    return format_prompt(tok, text)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, tiny_model, make_ckpt):
    """(name, engine, checkpoint dir, dtype) for one checkpoint variant; one engine alive at a time."""
    from flas_vllm.engine.llm import FlasLLM

    name = request.param
    spec = VARIANTS[name]
    ckpt = make_ckpt(**spec)
    suffix = ".pt" if spec.get("fmt") == "pt" else ".safetensors"
    assert [f.suffix for f in ckpt.iterdir() if f.suffix in (".pt", ".safetensors")] == [suffix]
    dtype = spec.get("dtype", "float32")
    t0 = time.perf_counter()
    llm = FlasLLM(str(tiny_model), str(ckpt), dtype=dtype, enforce_eager=True,
                  kv_cache_memory_bytes=KV_BYTES, seed=0, max_concepts=4)
    TIMINGS[f"{name} start"] = time.perf_counter() - t0
    yield name, llm, ckpt, dtype
    shutdown_engine(llm)
    del llm
    TIMINGS[f"{name} total"] = time.perf_counter() - t0
    print(f"\nengine timings (s): {TIMINGS}")


def _hf(tiny_model, ckpt, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flas_vllm.reference.hf import HFSteerer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=getattr(torch, dtype),
                                                 attn_implementation="eager")
    return HFSteerer(model, AutoTokenizer.from_pretrained(str(tiny_model)), str(ckpt))


def _vllm(llm, prompts, cases):
    from vllm import SamplingParams

    from flas_vllm.core.steering import steering

    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                       extra_args=None if c is None else steering(c, t))
        for _, c, t in cases
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _reference(steerer, prompts, cases):
    refs = [None] * len(cases)
    groups: dict = {}
    for i, (_, c, _t) in enumerate(cases):
        groups.setdefault(c, []).append(i)
    for concept, idx in groups.items():
        gens = steerer.generate([prompts[i] for i in idx], concept, [float(cases[i][2] or 0.0) for i in idx],
                                max_new_tokens=MAX_TOKENS, use_cache=True, ignore_eos=True)
        for i, g in zip(idx, gens):
            refs[i] = g
    return refs


def test_matches_transformers(variant, tiny_model):
    name, llm, ckpt, dtype = variant
    steerer = _hf(tiny_model, ckpt, dtype)
    prompts = [_ids(steerer.tokenizer, text) for text, _, _ in CASES]
    assert max(len(p) for p in prompts) > 100  # well past the 32-token sliding window
    from flas_vllm.core.concept import tokenize_concept

    assert len(steerer.tokenizer(LONG_CONCEPT)["input_ids"]) > 64
    assert len(tokenize_concept(steerer.tokenizer, LONG_CONCEPT, steerer.concept_len)) == 64
    assert steerer.concept_len == 64  # whatever concept_max_len the checkpoint config says
    if VARIANTS[name].get("concept_encoder"):
        assert steerer.encoder is not steerer.model.model  # the checkpoint's own encoder

    got = _vllm(llm, prompts, CASES)
    refs = _reference(steerer, prompts, CASES)
    compared = 0
    for (text, concept, t), out, ref in zip(CASES, got, refs):
        what = f"{name}: concept={concept!r:.30} T={t}"
        assert len(out.token_ids) == MAX_TOKENS
        if dtype == "float32":
            if list(out.token_ids) != ref.token_ids:
                i = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)) if a != b)
                pytest.fail(f"{what}: differs from HF at step {i}: {list(out.token_ids[i:i + 6])} vs "
                            f"{ref.token_ids[i:i + 6]} (HF top-2 margin {ref.top2_margins[i]:.4f})")
            assert math.isclose(out.cumulative_logprob, sum(ref.logprobs), abs_tol=1e-3), (
                f"{what}: cumulative logprob {out.cumulative_logprob} vs HF {sum(ref.logprobs)}")
            compared += MAX_TOKENS
        else:
            n = _compare_near_ties(out, ref, what)
            if n < MAX_TOKENS:
                print(f"\n{what}: bf16 near-tie divergence at step {n} (HF margin {ref.top2_margins[n]:.4f})")
            compared += n
    # a bf16 divergence may end a comparison early, but most steps must have been compared
    assert compared >= 0.75 * MAX_TOKENS * len(CASES), f"{name}: only {compared} steps compared"
    # the flow does something in every variant: steered MID differs from unsteered MID
    assert list(got[1].token_ids) != list(got[7].token_ids), name
    assert list(got[4].token_ids) != list(got[7].token_ids), name


def _compare_near_ties(out, ref, what) -> int:
    """Token for token until the first divergence, which must be at an HF near-tie."""
    for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)):
        if a != b:
            assert ref.top2_margins[i] < NEAR_TIE, (
                f"{what}: diverges from HF at step {i} ({a} vs {b}) although HF's top-2 margin there is "
                f"{ref.top2_margins[i]:.4f} (>= {NEAR_TIE})")
            return i
        lp = out.logprobs[i][a].logprob
        assert abs(lp - ref.logprobs[i]) < 0.1 + 0.05 * abs(ref.logprobs[i]), (
            f"{what}: step {i} logprob {lp} vs HF {ref.logprobs[i]}")
    return len(out.token_ids)


def test_chat_uses_the_checkpoints_prompt_format(variant, tiny_model):
    """FlasLLM.chat formats a base-model checkpoint's prompts in the alpaca format, others with the template."""
    from vllm import SamplingParams

    from flas_vllm.core.prompts import format_prompt

    name, llm, ckpt, _ = variant
    fmt = VARIANTS[name].get("prompt_format", "chat")
    assert llm.prompt_format == fmt
    out = llm.chat([[{"role": "user", "content": SHORT}]], SamplingParams(max_tokens=2, temperature=0.0),
                   use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == format_prompt(llm.get_tokenizer(), SHORT, fmt)
