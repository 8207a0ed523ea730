"""The benchmark workload: AlpacaEval prompts, K concepts, mixed flowtimes."""

from __future__ import annotations


from importlib import resources
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flas_vllm.core.prompts import format_prompt
from flas_vllm.fixtures.tiny_gemma2 import load_alpaca


# ---------------------------------------------------------------------------
# workload


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids (chat-formatted, <bos> included)
    texts: list[str]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def build_workload(model_dir: Path, n: int, max_prompt_tokens: int, prompt_format: str = "chat") -> Workload:
    """The first AlpacaEval instructions (cycled when more are needed) as token ids."""
    from transformers import AutoTokenizer  # lazy: transformers is heavy

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pool: list[tuple[str, list[int]]] = []
    for row in load_alpaca():
        ids = format_prompt(tok, row["instruction"], prompt_format)
        if len(ids) <= max_prompt_tokens:
            pool.append((row["instruction"], ids))
    if not pool:
        raise ValueError(f"no AlpacaEval instruction fits in {max_prompt_tokens} tokens")
    picked = [pool[i % len(pool)] for i in range(n)]
    return Workload(prompts=[p for _, p in picked], texts=[t for t, _ in picked])


def concept_pool() -> list[str]:
    try:
        text = resources.files("flas_vllm.data").joinpath("concept500_2b_l20_metadata.jsonl").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # a bare checkout
        text = (Path(__file__).parent / "data" / "concept500_2b_l20_metadata.jsonl").read_text("utf-8")
    return [json.loads(line)["concept"] for line in text.splitlines() if line.strip()]


def make_concepts(k: int, tag: str) -> list[str]:
    """K distinct concept strings (AxBench Concept500 phrases), unique per `tag` so each run encodes fresh ones."""
    pool = concept_pool()
    return [f"{pool[i % len(pool)]} ({tag}-{i})" for i in range(k)]


def make_flowtimes(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.5, 2.0), 3) for _ in range(n)]


def steered_mask(n: int, fraction: float) -> list[bool]:
    """Which of n requests are steered in a mixed-traffic run: round(n * fraction) of them (at least one,
    at most n - 1), spread evenly over the batch."""
    m = min(n - 1, max(1, round(n * fraction)))
    picked = {j * n // m for j in range(m)}
    return [i in picked for i in range(n)]


def assign_round_robin(n: int, concepts: Sequence[str]) -> list[str]:
    return [concepts[i % len(concepts)] for i in range(n)]


