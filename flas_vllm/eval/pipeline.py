"""AxBench evaluation pipeline: generate -> judge -> score, on one engine or sharded over Ray.

With Ray, concepts are split into shards; each actor owns one engine (one GPU
where there are GPUs) and writes its shard's rows into its own resumable part
directory. A shard whose actor dies is re-run on a fresh actor, which skips the
rows already on disk. Because every request's seed depends only on (seed,
concept, prompt, flowtime), the merged rows equal a single-process run's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flas_vllm.core.steering import STOP_RULES
from flas_vllm.engine.llm import FlasLLM
from flas_vllm.eval.concept_sets import load_concept_ids, select_concepts
from flas_vllm.eval.generate import (
    GENERATION_SCHEMA, Concept, GenerationSettings, PartWriter, build_jobs, completed_keys, generate_rows,
    id_sort_key, load_concepts, load_prompts, read_parts, schema_as_stored, schema_for_ids,
)

logger = logging.getLogger(__name__)


@dataclass
class GenerateSpec:
    model: str
    checkpoint: str
    concepts: str
    prompts: str
    num_prompts: int
    flowtimes: list[float]
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    max_concepts: int | None = None
    num_concepts: int | None = None  # the first N concepts in file order; None = all
    concept_ids: str | None = None  # a JSON id list (file or bundled name), the original's --concept-ids-file
    n_steps: int | None = None  # Euler steps for every request; None = the checkpoint config's


def _engine(spec: GenerateSpec):
    kwargs = dict(spec.engine_kwargs)
    if spec.max_concepts:
        kwargs["max_concepts"] = spec.max_concepts
    if spec.n_steps:
        kwargs["n_steps"] = spec.n_steps
    return FlasLLM(spec.model, spec.checkpoint, **kwargs)


def pending_jobs(spec: GenerateSpec, concepts: Sequence[Concept], out_dir: str | Path) -> list:
    """The (concept, prompt, flowtime) jobs of `concepts` with no row in `out_dir` yet."""
    jobs = build_jobs(concepts, load_prompts(spec.prompts), spec.flowtimes, spec.num_prompts, spec.settings.seed)
    done = completed_keys(read_parts(out_dir, GENERATION_SCHEMA))
    return [j for j in jobs if j.key not in done]


def generate_into(llm, spec: GenerateSpec, concepts: Sequence[Concept], out_dir: str | Path,
                  progress: bool = True) -> int:
    """Generate every missing row for `concepts` into `out_dir` (resumable)."""
    todo = pending_jobs(spec, concepts, out_dir)
    if not todo:
        return 0
    writer = PartWriter(out_dir, schema_for_ids(GENERATION_SCHEMA, [c.concept_id for c in concepts]))
    return generate_rows(llm, todo, spec.settings, writer, checkpoint_name=str(spec.checkpoint), progress=progress)


def validate_spec(spec: GenerateSpec) -> list[Concept]:
    """Check the inputs before starting any engine; each error names the option."""
    if not spec.flowtimes:
        raise ValueError("--flowtimes: give at least one flowtime")
    for t in spec.flowtimes:
        if not (t == t) or t < 0 or t == float("inf"):
            raise ValueError(f"--flowtimes: {t} is not a finite number >= 0")
    if len(set(spec.flowtimes)) != len(spec.flowtimes):
        raise ValueError(f"--flowtimes: a value is listed twice in {spec.flowtimes}")
    ids = load_concept_ids(spec.concept_ids) if spec.concept_ids is not None else None
    concepts = select_concepts(load_concepts(spec.concepts), ids=ids, num=spec.num_concepts, source=spec.concepts)
    n = len(load_prompts(spec.prompts))
    if not 1 <= spec.num_prompts <= n:
        raise ValueError(f"--num-prompts must be within [1, {n}] (prompts in {spec.prompts}), got {spec.num_prompts}")
    if spec.settings.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {spec.settings.max_tokens}")
    if not 0 < spec.settings.top_p <= 1:
        raise ValueError(f"--top-p must be within (0, 1], got {spec.settings.top_p}")
    if spec.settings.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {spec.settings.temperature}")
    if spec.n_steps is not None and spec.n_steps < 1:
        raise ValueError(f"--n-steps must be >= 1, got {spec.n_steps}")
    if spec.settings.max_prompt_tokens is not None and spec.settings.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {spec.settings.max_prompt_tokens}")
    if spec.settings.stop_rule not in STOP_RULES:
        raise ValueError(f"--stop-rule must be one of {', '.join(STOP_RULES)}, got {spec.settings.stop_rule!r}")
    return concepts


def merge_generations(parts_dirs: Sequence[str | Path], out_file: str | Path) -> pa.Table:
    """Union of shard parts, one row per key, sorted: the run's final generations.parquet."""
    paths = [p for d in parts_dirs for p in sorted(Path(d).glob("part-*.parquet"))]
    schema = schema_as_stored(GENERATION_SCHEMA, paths) if paths else GENERATION_SCHEMA
    rows = {}
    for d in parts_dirs:
        for r in read_parts(d, schema).to_pylist():
            rows.setdefault((r["concept_id"], r["prompt_id"], r["flowtime"]), r)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (id_sort_key(k[0]), k[1], k[2]))]
    merged = pa.Table.from_pylist(ordered, schema=schema)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    pq.write_table(merged, tmp)
    tmp.replace(out_file)
    return merged


def run_generate(spec: GenerateSpec, out_dir: str | Path, progress: bool = True) -> pa.Table:
    concepts = validate_spec(spec)
    out = Path(out_dir)
    if pending_jobs(spec, concepts, out / "parts"):  # a finished run resumes without starting an engine
        generate_into(_engine(spec), spec, concepts, out / "parts", progress=progress)
    return merge_generations([out / "parts"], out / "generations.parquet")


# ---------------------------------------------------------------------------
# Ray


def shard_concepts(concepts: Sequence[Concept], num_shards: int) -> list[list[Concept]]:
    shards: list[list[Concept]] = [[] for _ in range(max(1, num_shards))]
    for i, c in enumerate(sorted(concepts, key=lambda c: id_sort_key(c.concept_id))):
        shards[i % len(shards)].append(c)
    return [s for s in shards if s]


def run_generate_ray(spec: GenerateSpec, out_dir: str | Path, *, num_actors: int = 2, shards_per_actor: int = 2,
                     ray_address: str | None = None, num_gpus_per_actor: float | None = None,
                     max_shard_attempts: int = 3, progress: bool = False) -> pa.Table:
    """Shard concepts over Ray actors (one engine each); retry a dead actor's shard on a fresh one."""
    import ray  # optional: ray (eval extra)

    concepts = validate_spec(spec)
    out = Path(out_dir).resolve()
    shards = shard_concepts(concepts, num_actors * shards_per_actor)
    shard_dirs = [out / "shards" / f"shard-{i:04d}" for i in range(len(shards))]
    if not any(pending_jobs(spec, s, d) for s, d in zip(shards, shard_dirs)):  # finished: no cluster needed
        return merge_generations(shard_dirs, out / "generations.parquet")
    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=max(2, num_actors), include_dashboard=False)
            started_here = True
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_actor, max_restarts=0)(GenerationActor)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards" / "plan.json").write_text(json.dumps(
        [[c.concept_id for c in s] for s in shards]))
    actors = [actor_cls.remote(_spec_dict(spec)) for _ in range(num_actors)]
    queue = list(range(len(shards)))
    attempts = {i: 0 for i in queue}
    running: dict[Any, tuple[int, Any]] = {}
    idle = list(actors)
    try:
        while queue or running:
            while queue and idle:
                shard = queue.pop(0)
                actor = idle.pop()
                attempts[shard] += 1
                ref = actor.generate_shard.remote([asdict(c) for c in shards[shard]], str(shard_dirs[shard]))
                running[ref] = (shard, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            shard, actor = running.pop(ref)
            try:
                ray.get(ref)
                idle.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                logger.warning("shard %d: actor died (%s); retrying on a fresh actor", shard, exc)
                if attempts[shard] >= max_shard_attempts:
                    raise RuntimeError(f"shard {shard} failed {attempts[shard]} times; last error: {exc}") from exc
                queue.insert(0, shard)
                idle.append(actor_cls.remote(_spec_dict(spec)))
    finally:
        for a in actors + idle:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started_here:
            ray.shutdown()
    return merge_generations(shard_dirs, out / "generations.parquet")


def _spec_dict(spec: GenerateSpec) -> dict:
    return asdict(spec)


class GenerationActor:
    """One engine per actor; generates whole concept shards into resumable part directories."""

    def __init__(self, spec: dict):
        settings = GenerationSettings(**spec.pop("settings"))
        self.spec = GenerateSpec(**spec, settings=settings)
        self.llm = _engine(self.spec)

    def pid(self) -> int:
        return os.getpid()

    def generate_shard(self, concepts: list[dict], out_dir: str) -> int:
        return generate_into(self.llm, self.spec, [Concept(**c) for c in concepts], out_dir, progress=False)
