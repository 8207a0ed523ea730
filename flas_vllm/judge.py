"""AxBench's LLM judge against any OpenAI-compatible endpoint: async, bounded, retried, resumable.

Each generation gets three ratings (concept, instruction, fluency; 0..2) from
AxBench's templates. A rating that cannot be parsed, or a call that still fails
after its retries, marks the row as a judge failure: the row is kept, counted,
never scored as 0, and judged again on the next run (the newest row per key wins).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from flas_vllm.offline import GENERATION_SCHEMA, PartWriter, read_parts

RATING = re.compile(r"Rating:\s*\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")
ASPECTS = ("concept", "instruction", "fluency")

JUDGE_SCHEMA = pa.schema(list(GENERATION_SCHEMA) + [
    ("concept_score", pa.float64()),
    ("instruction_score", pa.float64()),
    ("fluency_score", pa.float64()),
    ("judge_failed", pa.bool_()),
    ("judge_error", pa.string()),
    ("judge_model", pa.string()),
])


def load_templates() -> dict[str, str]:
    raw = json.loads(resources.files("flas_vllm.data").joinpath("judge_templates.json").read_text())
    return raw["templates"]


def parse_rating(text: str | None) -> float | None:
    """The last `Rating: [[x]]` with x in 0..2, else None."""
    if not text:
        return None
    found = RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 2.0 else None


@dataclass
class JudgeSettings:
    base_url: str
    model: str
    api_key: str = "EMPTY"
    concurrency: int = 16
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_tokens: int = 512
    flush_rows: int = 64


class JudgeError(Exception):
    pass


async def _rate(client, settings: JudgeSettings, prompt: str) -> float:
    import openai

    last = "no attempt"
    for attempt in range(settings.max_attempts):
        try:
            resp = await client.chat.completions.create(
                model=settings.model, messages=[{"role": "user", "content": prompt}],
                temperature=0.0, max_tokens=settings.max_tokens,
            )
            text = resp.choices[0].message.content if resp.choices else None
            value = parse_rating(text)
            if value is None:
                last = f"unparseable rating: {(text or '')[:120]!r}"
            else:
                return value
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as exc:
            last = f"{type(exc).__name__}: {exc}"[:300]
        except openai.APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code != 429:
                raise JudgeError(f"HTTP {exc.status_code}: {exc.message}"[:300]) from exc
            last = f"HTTP {exc.status_code}"
        if attempt + 1 < settings.max_attempts:
            delay = settings.backoff_seconds * (2 ** attempt)
            await asyncio.sleep(delay * (0.5 + random.random()))
    raise JudgeError(last)


async def _judge_row(client, settings, templates, row: dict, sem: asyncio.Semaphore) -> dict:
    prompts = {
        "concept": templates["concept"].format(concept=row["concept"], sentence=row["generation"]),
        "instruction": templates["instruction"].format(instruction=row["prompt"], sentence=row["generation"]),
        "fluency": templates["fluency"].format(sentence=row["generation"]),
    }
    out = dict(row)
    errors = []
    async with sem:
        results = await asyncio.gather(*(_rate(client, settings, prompts[a]) for a in ASPECTS),
                                       return_exceptions=True)
    for aspect, value in zip(ASPECTS, results):
        if isinstance(value, Exception):
            out[f"{aspect}_score"] = None
            errors.append(f"{aspect}: {value}")
        else:
            out[f"{aspect}_score"] = value
    out["judge_failed"] = bool(errors)
    out["judge_error"] = "; ".join(errors)
    out["judge_model"] = settings.model
    return out


def latest_judgements(judge_dir: str | Path) -> dict[tuple, dict]:
    """The newest judgement per (concept_id, prompt_id, flowtime)."""
    rows = read_parts(judge_dir, JUDGE_SCHEMA).to_pylist()
    return {(r["concept_id"], r["prompt_id"], r["flowtime"]): r for r in rows}


async def judge_async(generations: Sequence[dict], judge_dir: str | Path, settings: JudgeSettings,
                      progress: bool = True) -> dict:
    from openai import AsyncOpenAI

    done = latest_judgements(judge_dir)
    todo = [g for g in generations
            if (g["concept_id"], g["prompt_id"], g["flowtime"]) not in done
            or done[(g["concept_id"], g["prompt_id"], g["flowtime"])]["judge_failed"]]
    writer = PartWriter(judge_dir, JUDGE_SCHEMA)
    templates = load_templates()
    client = AsyncOpenAI(base_url=settings.base_url, api_key=settings.api_key, max_retries=0,
                         timeout=settings.timeout_seconds)
    sem = asyncio.Semaphore(settings.concurrency)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="row", desc="judge", dynamic_ncols=True)
    pending: list[dict] = []
    failed = 0
    try:
        for fut in asyncio.as_completed([_judge_row(client, settings, templates, g, sem) for g in todo]):
            row = await fut
            failed += row["judge_failed"]
            pending.append(row)
            if bar is not None:
                bar.update(1)
            if len(pending) >= settings.flush_rows:
                writer.write(pending)
                pending = []
        writer.write(pending)
    finally:
        if bar is not None:
            bar.close()
        await client.close()
    return {"judged": len(todo), "failed": failed, "skipped": len(generations) - len(todo)}


def judge(generations: Sequence[dict], judge_dir: str | Path, settings: JudgeSettings, progress: bool = True) -> dict:
    return asyncio.run(judge_async(generations, judge_dir, settings, progress))
