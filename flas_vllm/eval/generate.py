"""Bulk generation over concepts x prompts x flowtimes, resumable at any moment.

Every (concept, prompt, flowtime) request goes into ONE engine so continuous
batching mixes them. Finished rows are flushed to numbered parquet parts
(written to a temporary name, then renamed), so a run killed at any point and
restarted with the same arguments skips what is on disk and completes the set
with no duplicate and no lost row. Each request's sampling seed is derived
from (seed, concept_id, prompt_id, flowtime), so a row does not depend on batch
order, on resumes, or on how concepts are sharded across machines.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from flas_vllm.core.prompts import format_prompt, truncate_prompt
from flas_vllm.core.steering import STOP_RULE_KEY, steering
from tqdm import tqdm

GENERATION_SCHEMA = pa.schema([
    ("concept_id", pa.int64()),
    ("concept", pa.string()),
    ("prompt_id", pa.int64()),
    ("prompt", pa.string()),
    ("flowtime", pa.float64()),
    ("generation", pa.string()),
    ("finish_reason", pa.string()),
    ("n_tokens", pa.int64()),
    ("seed", pa.int64()),
    ("checkpoint", pa.string()),
    ("prompt_position", pa.int64()),
])
"""One row per (concept_id, prompt_id, flowtime). prompt_id is the instruction's
index in the prompt file (file order); prompt_position is its position in the
concept's sampled list (0..n-1, the sampling order: the id the protocol splits
on); flowtime 0 rows are unsteered. concept_id is int64, or string for a concept
set whose ids are strings (see `schema_for_ids`)."""

ConceptId = Union[int, str]


@dataclass(frozen=True)
class Concept:
    concept_id: ConceptId
    concept: str


@dataclass(frozen=True)
class Job:
    concept_id: ConceptId
    concept: str
    prompt_id: int
    prompt: str
    flowtime: float
    seed: int
    prompt_position: int

    @property
    def key(self) -> tuple[ConceptId, int, float]:
        return (self.concept_id, self.prompt_id, self.flowtime)


def id_sort_key(concept_id: ConceptId) -> tuple:
    """Integers in numeric order, then strings: a total order over one run's ids."""
    return (1, concept_id) if isinstance(concept_id, str) else (0, concept_id)


def schema_for_ids(schema: pa.Schema, ids: Iterable[ConceptId]) -> pa.Schema:
    """`schema` with a string concept_id column when the ids are strings (FLAS-46k hashes), else int64."""
    if any(isinstance(i, str) for i in ids):
        return schema.set(schema.get_field_index("concept_id"), pa.field("concept_id", pa.string()))
    return schema


# ---------------------------------------------------------------------------
# inputs


def load_concepts(path: str | Path) -> list[Concept]:
    """AxBench metadata.jsonl, an AxBench/any parquet, a CSV, or a text list (one concept a line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"concepts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out = [_concept_from_row(r, i, path) for i, r in enumerate(rows)]
    elif suffix == ".parquet":
        table = pq.read_table(path)
        cols = set(table.column_names)
        name_col = "concept" if "concept" in cols else "output_concept" if "output_concept" in cols else None
        if name_col is None:
            raise ValueError(f"{path}: parquet needs a 'concept' or 'output_concept' column, has {sorted(cols)}")
        ids = table.column("concept_id").to_pylist() if "concept_id" in cols else None
        names = table.column(name_col).to_pylist()
        seen: dict[ConceptId, str] = {}
        for i, name in enumerate(names):
            cid = ids[i] if ids is not None else i
            if (isinstance(cid, int) and cid < 0) or not name:  # AxBench negatives carry concept_id -1
                continue
            seen.setdefault(cid, str(name))
        out = [Concept(cid, seen[cid]) for cid in sorted(seen, key=id_sort_key)]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        out = [_concept_from_row(r, i, path, csv_row=True) for i, r in enumerate(rows)]
    else:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        out = [Concept(i, line) for i, line in enumerate(line for line in lines if line)]
    ids = [c.concept_id for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: concept_id values are not unique")
    if not out:
        raise ValueError(f"{path}: no concepts found")
    kinds = {type(i).__name__ for i in ids}
    if len(kinds) > 1:
        raise ValueError(f"{path}: concept_id values mix integers and strings; one concept set has one kind")
    return out


def _concept_from_row(row: dict, index: int, path: Path, csv_row: bool = False) -> Concept:
    """Ids keep their JSON type (the prompt sample is seeded by the id itself: 7 and "7" differ)."""
    name = row.get("concept") or row.get("output_concept")
    if not name:
        raise ValueError(f"{path}: row {index} has no 'concept' field")
    cid = row.get("concept_id", index)
    if csv_row and isinstance(cid, str) and cid.strip().lstrip("-").isdigit():
        cid = int(cid)  # CSV has no types: digits are an integer id
    if isinstance(cid, bool) or not isinstance(cid, (int, str)) or cid == "":
        raise ValueError(f"{path}: row {index} has concept_id {cid!r}; expected an integer or a non-empty string")
    return Concept(cid, str(name))


def load_prompts(path: str | Path) -> list[str]:
    """AlpacaEval JSON (list of {"instruction": ...}), JSONL, or parquet; file order is kept."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table = pq.read_table(path)
        col = next((c for c in ("instruction", "prompt", "input") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{path}: parquet needs an 'instruction', 'prompt' or 'input' column")
        rows = [{"instruction": v} for v in table.column(col).to_pylist()]
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
    prompts = []
    for i, row in enumerate(rows):
        text = row if isinstance(row, str) else (row.get("instruction") or row.get("prompt") or row.get("input"))
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}: entry {i} has no 'instruction' text")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def sample_prompt_ids(concept_id: ConceptId, num_prompts: int, num_available: int) -> list[int]:
    """AxBench's rule, random.Random(concept_id).sample(instructions, n), as indices into file order.

    The list order is the sampling order: a prompt's position in it is the id the protocol splits on."""
    if not 1 <= num_prompts <= num_available:
        raise ValueError(f"num_prompts must be within [1, {num_available}], got {num_prompts}")
    return random.Random(concept_id).sample(range(num_available), num_prompts)


def request_seed(seed: int, concept_id: ConceptId, prompt_id: int, flowtime: float) -> int:
    digest = hashlib.sha256(f"{seed}|{concept_id}|{prompt_id}|{flowtime!r}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def build_jobs(concepts: Sequence[Concept], prompts: Sequence[str], flowtimes: Sequence[float],
               num_prompts: int, seed: int) -> list[Job]:
    jobs = []
    for c in concepts:
        for position, pid in enumerate(sample_prompt_ids(c.concept_id, num_prompts, len(prompts))):
            for t in flowtimes:
                t = float(t)
                jobs.append(Job(c.concept_id, c.concept, pid, prompts[pid], t,
                                request_seed(seed, c.concept_id, pid, t), position))
    return jobs


# ---------------------------------------------------------------------------
# durable parts


class PartWriter:
    """Append-only parquet parts in one directory; a part appears complete or not at all."""

    def __init__(self, directory: str | Path, schema: pa.Schema, prefix: str = "part"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.prefix = prefix
        existing = sorted(self.dir.glob(f"{prefix}-*.parquet"))
        self._next = 1 + max((int(p.stem.split("-")[-1]) for p in existing), default=-1)

    def write(self, rows: list[dict]) -> Path | None:
        if not rows:
            return None
        path = self.dir / f"{self.prefix}-{self._next:06d}.parquet"
        tmp = self.dir / f".{path.name}.{os.getpid()}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._next += 1
        return path


def read_parts(directory: str | Path, schema: pa.Schema, prefix: str = "part") -> pa.Table:
    """Every part as `schema`, concept_id typed as stored; columns an older part lacks read as null."""
    paths = sorted(Path(directory).glob(f"{prefix}-*.parquet"))
    if not paths:
        return schema.empty_table()
    schema = schema_as_stored(schema, paths)
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in paths])


def load_generations(path: str | Path) -> list[dict]:
    """Rows of a generate stage: its output directory, its generations.parquet, or a parts directory.

    An input with no rows is an error naming the path (never a silent "judged 0 rows").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "generations.parquet").exists():
        path = path / "generations.parquet"
    elif path.is_dir() and (path / "parts").is_dir():
        path = path / "parts"
    table = read_parts(path, GENERATION_SCHEMA) if path.is_dir() else pq.read_table(path)
    if table.num_rows == 0:
        raise ValueError(f"{path}: no generation rows (give the directory `flas-vllm generate --out` wrote, its "
                         "generations.parquet, or its parts/ directory)")
    return table.to_pylist()


def schema_as_stored(schema: pa.Schema, paths: Sequence[str | Path]) -> pa.Schema:
    """`schema` with the concept_id type the files hold; files of both kinds are refused (never cast)."""
    kinds = set()
    for p in paths:
        stored = pq.read_schema(p)
        if "concept_id" in stored.names:
            kinds.add(pa.types.is_string(stored.field("concept_id").type))
    if len(kinds) > 1:
        raise ValueError(f"{Path(paths[0]).parent}: parts hold both integer and string concept ids: rows from "
                         "different concept sets in one directory; use a separate directory per concept set")
    return schema_for_ids(schema, ["string"] if kinds == {True} else [])


def completed_keys(table: pa.Table) -> set[tuple[ConceptId, int, float]]:
    return set(zip(table.column("concept_id").to_pylist(), table.column("prompt_id").to_pylist(),
                   table.column("flowtime").to_pylist()))


# ---------------------------------------------------------------------------
# generation


@dataclass
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    flush_rows: int = 256
    flush_seconds: float = 30.0
    prompt_format: str | None = None  # None: the checkpoint config's ("alpaca" for base-model checkpoints)
    max_prompt_tokens: int | None = 512  # the original keeps each formatted prompt's first 512 tokens
    stop_rule: str = "original"  # stop at <eos> only, as the original; "vllm": every generation_config EOS


def job_request(job: Job, settings: GenerationSettings, tokenizer, prompt_format: str):
    """(prompt token ids, SamplingParams) of one job, as the original generator would run it:
    the checkpoint's prompt format, the first `max_prompt_tokens` tokens, its stop rule."""
    from vllm import SamplingParams  # lazy: vllm is heavy

    extra = steering(job.concept, job.flowtime) if job.flowtime > 0 else {}
    extra[STOP_RULE_KEY] = settings.stop_rule
    params = SamplingParams(max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
                            seed=job.seed, extra_args=extra)
    ids = truncate_prompt(format_prompt(tokenizer, job.prompt, prompt_format), settings.max_prompt_tokens)
    return ids, params


def generate_rows(llm, jobs: Iterable[Job], settings: GenerationSettings, writer: PartWriter,
                  checkpoint_name: str, progress: bool = True) -> int:
    """Run every job through one engine; flush finished rows durably as they complete."""
    engine = llm.llm_engine if hasattr(llm, "llm_engine") else llm.llm.llm_engine
    tokenizer = engine.get_tokenizer() if hasattr(engine, "get_tokenizer") else llm.get_tokenizer()
    jobs = list(jobs)
    prompt_format = settings.prompt_format or getattr(llm, "prompt_format", None) or "chat"
    by_id: dict[str, Job] = {}
    for i, job in enumerate(jobs):
        prompt_ids, params = job_request(job, settings, tokenizer, prompt_format)
        rid = f"flas-gen-{i}"
        by_id[rid] = job
        engine.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, params)

    bar = None
    if progress:
        bar = tqdm(total=len(jobs), unit="req", desc="generate", dynamic_ncols=True)
    pending: list[dict] = []
    done = tokens = 0
    start = last_flush = time.monotonic()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                job = by_id.pop(out.request_id)
                comp = out.outputs[0]
                pending.append({
                    "concept_id": job.concept_id, "concept": job.concept, "prompt_id": job.prompt_id,
                    "prompt": job.prompt, "flowtime": job.flowtime, "generation": comp.text,
                    "finish_reason": comp.finish_reason or "", "n_tokens": len(comp.token_ids),
                    "seed": job.seed, "checkpoint": checkpoint_name, "prompt_position": job.prompt_position,
                })
                tokens += len(comp.token_ids)
                done += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - start, 1e-9):.1f}")
            now = time.monotonic()
            if len(pending) >= settings.flush_rows or (pending and now - last_flush >= settings.flush_seconds):
                writer.write(pending)
                pending, last_flush = [], now
        writer.write(pending)
    finally:
        if bar is not None:
            bar.close()
    return done
