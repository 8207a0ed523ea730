"""A tiny FLAS flow trained at fixture build time, so steering has a visible effect without a GPU.

Random flow weights (testing/checkpoints.py) prove the mechanics only. This
module trains `flas_vllm.core.flow.FlowFunction` itself on the tiny Gemma-2 with
FLAS's objective: language-model loss on positive examples only (a prompt,
then text about the concept; loss on the text), base model and concept encoder
frozen, the concept encoded by layers 0-1, a flowtime drawn uniformly from
[T_min, T_max] per example and Euler-integrated with the configured n_steps
(spec sections 3-5). The forward pass is the transformers path's own hook
(`flas_vllm.reference.hf`), so nothing here re-implements the flow math.

It is a toy: three concepts, a dozen sentences each (data/fixture_concepts.jsonl),
trained for seconds. Steering toward one of them makes the tiny model write that
concept's sentences; it says nothing about FLAS's quality on real models.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "FLOW_FIXTURE_VERSION",
    "TRAINED_CONCEPTS",
    "concept_word_share",
    "ensure_trained_flas_checkpoint",
    "train_fixture_flow",
]

# Bump whenever anything below (data, recipe, init, layout) changes what gets built.
FLOW_FIXTURE_VERSION = 1

# Recipe: one block at layer 2 of the 4-layer fixture (layers 0-1 encode the concept).
LAYER, NUM_BLOCKS, N_STEPS, T_MIN, T_MAX = 2, 1, 2, 0.5, 2.0
DEFAULT_TRAIN_STEPS = 400
EXAMPLES_PER_CONCEPT = 96
_BATCH_SIZE = 8
_LR = 1e-2
_WARMUP = 20
_SENTENCES_PER_EXAMPLE = (2, 3)
_MAX_INSTRUCTION_CHARS = 80  # short prompts: the loss is on the answer, the prompt is only context
_INIT_GATE = 0.1  # the original initializes every residual gate to 0.1
# Width-128 matrices: two threads gain little on idle cores (measured 35 s vs 21 s for the
# whole run) and lose 10x on a shared, busy CPU; one thread also gives the same weights everywhere.
_TRAIN_THREADS = 1

_NORMS_FROM_LAYER = {"pre_sa_norm": "input_layernorm", "post_sa_norm": "post_attention_layernorm",
                     "pre_mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
_MARKER = ".flas_trained_flow.json"
_WORD = re.compile(r"[a-z]+")


# AxBench metadata.jsonl columns (concept_id, concept), so `flas-vllm eval --concepts` reads it as is,
# plus each concept's words (what the demo and the tests count) and its training sentences.
CONCEPTS_FILE = "fixture_concepts.jsonl"


@lru_cache(maxsize=1)
def _concept_data() -> tuple[dict, ...]:
    from importlib import resources

    text = resources.files("flas_vllm.data").joinpath(CONCEPTS_FILE).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


TRAINED_CONCEPTS: tuple[str, ...] = tuple(c["concept"] for c in _concept_data())


def concept_words(concept: str) -> frozenset[str]:
    """The words that count as being about a trained concept."""
    for c in _concept_data():
        if c["concept"] == concept:
            return frozenset(c["words"])
    raise KeyError(f"{concept!r} is not a trained fixture concept; known: {', '.join(TRAINED_CONCEPTS)}")


def concept_word_share(text: str, concept: str) -> float:
    """Share of the text's words that are the concept's words (0 for an empty text): the demo's measure."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    vocab = concept_words(concept)
    return sum(w in vocab for w in words) / len(words)


# --------------------------------------------------------------------------- training data


def _examples(tok, seed: int) -> list[tuple[list[int], int, str]]:
    """(token ids, prompt length, concept): an AlpacaEval instruction answered with concept sentences.

    As in the original, prompt and answer are tokenized apart and concatenated,
    and the answer gets no end-of-turn: the loss is on the answer tokens only.
    """
    from flas_vllm.testing.fixtures import _load_alpaca
    from flas_vllm.core.prompts import format_prompt

    rng = random.Random(seed)
    instructions = [r["instruction"] for r in _load_alpaca() if len(r["instruction"]) <= _MAX_INSTRUCTION_CHARS]
    out = []
    for c in _concept_data():
        for _ in range(EXAMPLES_PER_CONCEPT):
            prompt = format_prompt(tok, rng.choice(instructions), "chat")
            answer = " ".join(rng.sample(c["sentences"], rng.randint(*_SENTENCES_PER_EXAMPLE)))
            ids = tok(answer, add_special_tokens=False)["input_ids"]
            out.append((prompt + ids, len(prompt), c["concept"]))
    return out


class _RowConceptKV:
    """`flow.ConceptKV` for a batch whose rows have different concepts (training mixes them).

    Each row's keys/values are projected on their own (positions 0..Lc-1) and
    padded; padding is masked exactly as the engine masks it.
    """

    def __init__(self, flow, encoded: list[torch.Tensor], seq_len: int):
        self.cap = flow.g.attn_logit_softcapping
        self.seq_len = seq_len
        width = max(len(c) for c in encoded)
        self.valid = torch.tensor([[i < len(c) for i in range(width)] for c in encoded])
        self.kv = []
        for kv_rows in zip(*(flow.project_concept(c) for c in encoded)):
            if kv_rows[0] is None:
                self.kv.append(None)
                continue
            pad = [(torch.nn.functional.pad(k, (0, 0, 0, 0, 0, width - len(k))),
                    torch.nn.functional.pad(v, (0, 0, 0, 0, 0, width - len(v)))) for k, v in kv_rows]
            self.kv.append((torch.stack([k for k, _ in pad]), torch.stack([v for _, v in pad])))

    def attend(self, block: int, q: torch.Tensor) -> torch.Tensor:
        from flas_vllm.core.flow import cross_attend

        k, v = self.kv[block]
        rows = q.view(k.shape[0], self.seq_len, *q.shape[1:])
        return cross_attend(rows, k, v, self.valid, self.cap).reshape(q.shape)


# --------------------------------------------------------------------------- training


def _initial_flow(model, geometry, seed: int):
    """Fresh flow as the original initializes it: gates 0.1, zero last time layer, MLP, self-attention
    and norms copied from base layer L."""
    from flas_vllm.core.config import FlasConfig
    from flas_vllm.core.flow import FlowFunction

    cfg = FlasConfig(model_id="fixture", layer=LAYER, num_blocks=NUM_BLOCKS, n_steps=N_STEPS,
                     T_min=T_MIN, T_max=T_MAX)
    with torch.random.fork_rng():  # seeded default init, without touching the caller's RNG
        torch.manual_seed(seed)
        flow = FlowFunction(geometry, cfg)
    src = model.model.layers[LAYER]
    with torch.no_grad():
        torch.nn.init.zeros_(flow.time_embed.mlp[2].weight)
        torch.nn.init.zeros_(flow.time_embed.mlp[2].bias)
        for block in flow.blocks:
            for p in block.parameters(recurse=False):
                p.fill_(_INIT_GATE)  # cross_gate, self_attn_gate, mlp_gate
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(block, proj).load_state_dict(getattr(src.mlp, proj).state_dict())
            if block.has_self:
                block.self_attn.load_state_dict(src.self_attn.state_dict())
            for mine, theirs in _NORMS_FROM_LAYER.items():
                if hasattr(block, mine):
                    getattr(block, mine).weight.copy_(getattr(src, theirs).weight)
    return flow


def _train(steerer, examples, *, seed: int, steps: int) -> list[float]:
    """AdamW on the flow only; a seeded order and seeded per-example flowtimes."""
    from flas_vllm.core.flow import euler_dt
    from flas_vllm.reference.hf import _StreamState
    from flas_vllm.testing.training import right_padded, train

    flow, model = steerer.flow, steerer.model
    for p in model.parameters():
        p.requires_grad_(False)
    encoded = {}
    for concept in {e[2] for e in examples}:  # frozen encoder: encode each concept once
        encoded[concept] = steerer.encode_concept(concept).clone()

    def loss_of(batch, gen):
        b = len(batch)
        ids, valid, labels = right_padded([(seq, n_prompt) for seq, n_prompt, _ in batch], 0)
        width = ids.shape[1]
        flowtime = T_MIN + (T_MAX - T_MIN) * torch.rand(b, generator=gen)
        dt = torch.stack([euler_dt(t, N_STEPS, flow.dtype) for t in flowtime])
        state = _StreamState()
        state.positions, state.valid = torch.arange(width).expand(b, width), valid
        concept = _RowConceptKV(flow, [encoded[c] for _, _, c in batch], width)
        with steerer._hook(state, steerer._new_caches(state, False, N_STEPS), concept, dt,
                           torch.ones(b, dtype=torch.bool), N_STEPS):
            return model(input_ids=ids, attention_mask=valid.long(), labels=labels).loss

    return train(flow, flow.parameters(), examples, seed=seed, steps=steps, batch_size=_BATCH_SIZE, lr=_LR,
                 warmup=_WARMUP, loss_of=loss_of)


def train_fixture_flow(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                       steps: int = DEFAULT_TRAIN_STEPS) -> dict:
    """Train the flow on the fixture model in `model_dir`; write an official-layout checkpoint to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flas_vllm.core.checkpoint import FlasCheckpoint, save_checkpoint
    from flas_vllm.core.config import FlowGeometry
    from flas_vllm.testing.lm_training import _torch_threads
    from flas_vllm.reference.hf import HFSteerer

    t0 = time.perf_counter()
    threads = _TRAIN_THREADS
    with _torch_threads(threads):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        flow = _initial_flow(model, FlowGeometry.from_base_config(model.config), seed)
        start = FlasCheckpoint(config=flow.cfg, tensors=flow.state_dict(), dtype=torch.float32,
                               path=Path(model_dir))
        steerer = HFSteerer(model, tok, start)  # its flow is the one trained below
        losses = _train(steerer, _examples(tok, seed), seed=seed, steps=steps)
    info = {
        "version": FLOW_FIXTURE_VERSION, "seed": seed, "train_steps": steps, "concepts": list(TRAINED_CONCEPTS),
        "first_loss": round(sum(losses[:10]) / len(losses[:10]), 4),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "train_seconds": round(time.perf_counter() - t0, 2), "torch_threads": threads,
    }
    save_checkpoint(out_dir, steerer.flow, extra_config={
        "model_id": str(model_dir), "seed": seed, "train_steps": steps, "fixture": "trained",
        "concepts": list(TRAINED_CONCEPTS)})
    return info


# --------------------------------------------------------------------------- cache


def _cache_key(model_dir: Path, seed: int, steps: int) -> str:
    """Identity of a build: recipe, data and the base fixture it was trained on."""
    try:
        base = json.loads((model_dir / ".flas_fixture.json").read_text()).get("key", "")
    except (OSError, ValueError):
        base = str(model_dir.resolve())
    blob = json.dumps({
        "version": FLOW_FIXTURE_VERSION, "base": base, "seed": seed, "steps": steps, "data": _concept_data(),
        "recipe": [LAYER, NUM_BLOCKS, N_STEPS, T_MIN, T_MAX, EXAMPLES_PER_CONCEPT, _BATCH_SIZE, _LR, _WARMUP,
                   list(_SENTENCES_PER_EXAMPLE), _MAX_INSTRUCTION_CHARS, _INIT_GATE, _TRAIN_THREADS],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_trained_flas_checkpoint(model_dir: str | os.PathLike | None = None, *, seed: int = 0,
                                   steps: int = DEFAULT_TRAIN_STEPS) -> Path:
    """The cached trained checkpoint for the fixture model (default: the cached tiny Gemma-2), built once."""
    from flas_vllm.testing.fixtures import _file_lock, build_atomically, ensure_tiny_gemma2, fixture_cache_dir

    model_dir = Path(model_dir) if model_dir is not None else ensure_tiny_gemma2()
    key = _cache_key(model_dir, seed, steps)
    cache = fixture_cache_dir()
    out = cache / f"flas-trained-v{FLOW_FIXTURE_VERSION}" / key

    def complete() -> bool:
        try:
            return json.loads((out / _MARKER).read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    if complete():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{key}.lock"):
        if not complete():
            def build(tmp: Path) -> None:
                info = train_fixture_flow(model_dir, tmp, seed=seed, steps=steps)
                (tmp / _MARKER).write_text(json.dumps({**info, "key": key}, indent=2) + "\n")  # last: complete

            build_atomically(out, build, key)
    return out
