"""The main job on an embedded default: steer a tiny fixture model and show that steering works.

The default flow is a toy trained at fixture build time on three concepts
(`flas_vllm/fixtures/trained_flow.py`); `random_flow=True` swaps in random weights, which change
the text but never toward a concept.
"""

from __future__ import annotations

import textwrap

from vllm import SamplingParams

from flas_vllm.core.steering import steering
from flas_vllm.engine.llm import FlasLLM, shutdown_engine
from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
from flas_vllm.fixtures.tiny_gemma2 import ensure_tiny_gemma2
from flas_vllm.fixtures.trained_flow import TRAINED_CONCEPTS, concept_word_share, ensure_trained_flas_checkpoint

# AlpacaEval questions the tiny model learned to answer, so the unsteered answer is fluent text.
DEMO_PROMPTS = [
    "Who is Larry Page?",
    "What causes the northern lights?",
]
DEMO_FLOWTIMES = [0.0, 1.0, 2.0]


def run_demo(*, max_tokens: int = 32, enforce_eager: bool = True, width: int = 96,
             random_flow: bool = False) -> list[dict]:
    kind = "random" if random_flow else "trained"
    print(f"flas-vllm demo: building (or reusing) a tiny Gemma-2 fixture and a {kind} FLAS flow for it ...")
    model_dir = ensure_tiny_gemma2()
    if random_flow:
        ckpt_dir = ensure_flas_checkpoint(model_dir, num_blocks=1)
    else:
        ckpt_dir = ensure_trained_flas_checkpoint(model_dir)
    print(f"  model:      {model_dir}\n  checkpoint: {ckpt_dir}")
    if random_flow:
        print("  NOTE: random flow weights: steering changes the text, but toward nothing.\n")
    else:
        print("  NOTE: a toy. The model is a 4-layer Gemma-2 trained for seconds; the flow was trained for seconds\n"
              "        on three concepts, a dozen sentences each. It shows steering working, not FLAS's quality.\n")
    llm = FlasLLM(
        str(model_dir), str(ckpt_dir), dtype="float32", enforce_eager=enforce_eager,
        max_model_len=512, kv_cache_memory_bytes=256 * 1024 * 1024, max_concepts=8,
    )
    try:
        return _steer_and_print(llm, max_tokens, width)
    finally:
        shutdown_engine(llm)  # before the interpreter exits: no "engine core exited unexpectedly"


def _steer_and_print(llm, max_tokens: int, width: int) -> list[dict]:
    keys = [(c, p, t) for c in TRAINED_CONCEPTS for p in DEMO_PROMPTS for t in DEMO_FLOWTIMES]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=steering(c, t) if t else None)
              for c, _, t in keys]
    # One call: every (concept, prompt, flowtime) shares the continuous batch.
    outputs = llm.chat([[{"role": "user", "content": p}] for _, p, _ in keys], params, use_tqdm=False)
    rows = [{"concept": c, "prompt": p, "flowtime": t, "text": o.outputs[0].text,
             "concept_word_share": concept_word_share(o.outputs[0].text, c)}
            for (c, p, t), o in zip(keys, outputs)]
    for concept in TRAINED_CONCEPTS:
        print("=" * width)
        print(f"CONCEPT: {concept!r}")
        for prompt in DEMO_PROMPTS:
            print(f"  PROMPT: {prompt}")
            for r in rows:
                if r["concept"] == concept and r["prompt"] == prompt:
                    label = f"    T={r['flowtime']:g}{' (unsteered)' if not r['flowtime'] else ''}:"
                    lines = textwrap.wrap(repr(r["text"]), width - 22) or [""]
                    print(f"{label:<22}{lines[0]}")
                    for line in lines[1:]:
                        print(" " * 22 + line)
        print(f"  concept-word share: {_shares(rows, concept)}")
    print("=" * width)
    print("concept-word share = share of generated words that are the concept's words "
          "(flas_vllm/data/fixture_concepts.jsonl), mean over the prompts")
    stats = llm.concept_stats()
    print(f"{len(rows)} requests ({len(rows) // len(DEMO_FLOWTIMES)} unsteered) in one batch; concept cache: "
          f"{stats['misses']} encoded, {stats['hits']} hits")
    return rows


def _shares(rows: list[dict], concept: str) -> str:
    parts = []
    for t in DEMO_FLOWTIMES:
        vals = [r["concept_word_share"] for r in rows if r["concept"] == concept and r["flowtime"] == t]
        parts.append(f"T={t:g}: {sum(vals) / len(vals):.2f}")
    return "   ".join(parts)
