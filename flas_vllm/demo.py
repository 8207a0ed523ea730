"""The main job on an embedded default: steer a tiny fixture model and show steered vs unsteered."""

from __future__ import annotations

import textwrap

DEMO_PROMPTS = [
    "Give three tips for staying healthy.",
    "Describe the city of Paris in a few sentences.",
    "Write a short poem about the ocean.",
]
DEMO_CONCEPTS = ["talk like a pirate", "references to cooking and recipes", "the color blue"]
DEMO_FLOWTIMES = [1.0, 2.0]


def run_demo(*, max_tokens: int = 24, enforce_eager: bool = True, width: int = 48) -> list[dict]:
    from vllm import SamplingParams

    from flas_vllm.testing.checkpoints import ensure_flas_checkpoint
    from flas_vllm.testing.fixtures import ensure_tiny_gemma2
    from flas_vllm.engine.llm import FlasLLM
    from flas_vllm.core.steering import steering

    print("flas-vllm demo: building (or reusing) a tiny Gemma-2 fixture and a random FLAS checkpoint ...")
    model_dir = ensure_tiny_gemma2()
    ckpt_dir = ensure_flas_checkpoint(model_dir, num_blocks=1)
    print(f"  model:      {model_dir}\n  checkpoint: {ckpt_dir}")
    print("  NOTE: the model is a tiny random Gemma-2 trained for seconds and the FLAS weights are random;")
    print("        outputs show the mechanics (steering changes generations), not meaningful steering.\n")
    llm = FlasLLM(
        str(model_dir), str(ckpt_dir), dtype="float32", enforce_eager=enforce_eager,
        max_model_len=512, kv_cache_memory_bytes=256 * 1024 * 1024, max_concepts=8,
    )
    prompts, params, keys = [], [], []
    for p in DEMO_PROMPTS:
        for concept in [None, *DEMO_CONCEPTS]:
            for t in [0.0] if concept is None else DEMO_FLOWTIMES:
                extra = steering(concept, t) if concept is not None else None
                prompts.append([{"role": "user", "content": p}])
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra))
                keys.append((p, concept, t))
    # One call: every (prompt, concept, flowtime) shares the continuous batch.
    outputs = llm.chat(prompts, params, use_tqdm=False)
    rows = [
        {"prompt": p, "concept": c, "flowtime": t, "text": o.outputs[0].text}
        for (p, c, t), o in zip(keys, outputs)
    ]
    for p in DEMO_PROMPTS:
        base = next(r for r in rows if r["prompt"] == p and r["concept"] is None)
        print("=" * (2 * width + 3))
        print(f"PROMPT: {p}")
        for r in rows:
            if r["prompt"] != p or r["concept"] is None:
                continue
            left = textwrap.wrap(repr(base["text"]), width) or [""]
            right = textwrap.wrap(repr(r["text"]), width) or [""]
            print(f"-- unsteered {'':<{width - 12}} | steered: {r['concept']!r} @ T={r['flowtime']}")
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                print(f"{a:<{width}} | {b}")
    stats = llm.concept_stats()
    changed = sum(1 for r in rows if r["concept"] is not None and r["text"] != next(
        b["text"] for b in rows if b["prompt"] == r["prompt"] and b["concept"] is None))
    steered = sum(1 for r in rows if r["concept"] is not None)
    print("=" * (2 * width + 3))
    print(f"{steered} steered and {len(DEMO_PROMPTS)} unsteered requests in one batch; "
          f"{changed}/{steered} steered generations differ from unsteered.")
    print(f"concept cache: {stats['misses']} encoded, {stats['hits']} hits, {stats['slots_in_use']} slots in use")
    return rows
