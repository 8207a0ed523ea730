"""What one benchmark run measures: its configuration."""

from __future__ import annotations


import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flas_vllm.bench.models import DEFAULT_KS, DEFAULT_OUT, MIB, MODELS
from flas_vllm.core.config import FLOW_GRAPHS_CHOICES


# ---------------------------------------------------------------------------
# configuration

ENGINE_PROCESS_CHOICES = ("auto", "inline", "separate")


@dataclass
class BenchConfig:
    model: str = "fixture"  # one of MODELS
    ks: Sequence[int] = DEFAULT_KS
    num_prompts: int | None = None  # default: max(ks), so every K really has K concepts in flight
    output_len: int = 32
    out_dir: Path = DEFAULT_OUT
    enforce_eager: bool = True
    dtype: str = "float32"
    kv_cache_memory_bytes: int = 512 * MIB
    max_model_len: int = 1024
    max_prompt_tokens: int = 192  # longer AlpacaEval instructions are skipped
    hf: bool = True  # run the transformers path
    hf_batch_size: int = 16
    hf_max_prompts: int | None = None  # cap the (slow) transformers path; None = the same prompts as vLLM
    # torch threads for the transformers path on CPU; None = what vLLM's CPU worker binds
    # (all cores but one it reserves, at least 1), so both paths get the same cores
    hf_threads: int | None = None
    # untimed warm-up batch per engine, 2 output tokens each: None = every prompt of the workload
    # (covers the batch shapes of the timed runs)
    warmup_requests: int | None = None
    encode_probe_concepts: int = 8
    # mixed traffic: runs where only this fraction of the requests is steered (the rest unsteered)
    mixed_fractions: Sequence[float] = (0.1, 0.5)
    # FLAS engine forced onto the CUDA-graph-safe flow path (FlasEngineOptions.graph_path): measures what
    # unsteered requests pay there (the flow runs on every token) while the skip path is all CPU can show
    graph_path: bool = False
    # what FULL CUDA graphs (and, with graph_path, every step) run of the flow (FlasEngineOptions.flow_graphs)
    flow_graphs: str = "traced"
    # where each vLLM engine's core runs: "inline" (in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0),
    # "separate" (vLLM's default: its own process beside the front end) or "auto" (inline on CPU, where the two
    # processes would share the few cores the CPU worker leaves free; separate elsewhere)
    engine_process: str = "auto"
    # also run vanilla vLLM with the KV capacity the FLAS engine gets: what the unsteered run costs beyond it
    equal_kv_vanilla: bool = True
    # the vLLM engines' sequence run this many times, one round after another: each round's ratios are side
    # by side, the report keeps their medians and every round (bench/rounds.py)
    rounds: int = 1
    seed: int = 0
    plot: bool = True

    def resolved(self) -> "BenchConfig":
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        ks = sorted({int(k) for k in self.ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {list(self.ks)}")
        n = self.num_prompts if self.num_prompts is not None else max(ks)
        if n < 1 or self.output_len < 1:
            raise ValueError("num_prompts and output_len must be >= 1")
        fractions = sorted({float(f) for f in self.mixed_fractions})
        if any(not 0 < f < 1 for f in fractions):
            raise ValueError(f"mixed fractions must lie strictly between 0 and 1, got {list(self.mixed_fractions)}")
        if self.flow_graphs not in FLOW_GRAPHS_CHOICES:
            raise ValueError(f"flow_graphs must be one of {', '.join(FLOW_GRAPHS_CHOICES)}, got {self.flow_graphs!r}")
        if self.engine_process not in ENGINE_PROCESS_CHOICES:
            raise ValueError(f"engine_process must be one of {', '.join(ENGINE_PROCESS_CHOICES)}, "
                             f"got {self.engine_process!r}")
        if int(self.rounds) < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if fractions and n < 2:
            raise ValueError("a mixed-traffic run needs num_prompts >= 2 (one steered, one unsteered)")
        return dataclasses.replace(self, ks=ks, num_prompts=n, out_dir=Path(self.out_dir), mixed_fractions=fractions)

    @property
    def stem(self) -> str:
        return bench_stem(self.model, self.graph_path, self.flow_graphs)

    @property
    def max_concepts(self) -> int:
        # >= max K so nothing waits for a slot; room for the warm-up and encode probes too
        return max(max(self.ks), self.encode_probe_concepts, 2)


def bench_stem(model: str, graph_path: bool = False, flow_graphs: str = "traced") -> str:
    """Result file name without suffix: a --graph-path or bucketed run sits next to the default one, never over it."""
    return f"bench_{model}" + ("-graph-path" if graph_path else "") + ("-bucketed" if flow_graphs == "bucketed" else "")


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc
    if not ks or min(ks) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return ks


