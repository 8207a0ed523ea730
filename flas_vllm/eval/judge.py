"""AxBench's LLM judge against any OpenAI-compatible endpoint: async, bounded, retried, resumable.

Each generation gets three ratings (concept, instruction, fluency; 0..2) from
AxBench's templates. A rating that cannot be parsed (the original's lenient rule, spec
section 7), or a call that still fails after its retries, marks the row as a
judge failure: the row is kept, counted, never scored as 0, and judged again on
the next run (the newest row per key wins). Each row records the judge model
(asked for and as served) and the endpoint: numbers from different judges must
never mix silently.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
from tqdm import tqdm

from flas_vllm.eval.generate import GENERATION_SCHEMA, PartWriter, read_parts, schema_for_ids

ASPECTS = ("concept", "instruction", "fluency")

JUDGE_SCHEMA = pa.schema(list(GENERATION_SCHEMA) + [
    ("concept_score", pa.float64()),
    ("instruction_score", pa.float64()),
    ("fluency_score", pa.float64()),
    ("judge_failed", pa.bool_()),
    ("judge_error", pa.string()),
    ("judge_model", pa.string()),
    ("judge_endpoint", pa.string()),
    ("judge_model_served", pa.string()),
])
"""judge_model: the name asked for; judge_model_served: what the endpoint says answered (a dated
snapshot behind an alias, e.g.); judge_endpoint: the base URL without credentials or query."""


def load_templates() -> dict[str, str]:
    raw = json.loads(resources.files("flas_vllm.data").joinpath("judge_templates.json").read_text())
    return raw["templates"]


def parse_rating(text: str | None) -> float | None:
    """Spec section 7, the original's rule: the first line of the text after the LAST `Rating:`, with `[`/`]`
    removed, then a trailing `.`, double quotes, single quotes and `*` stripped in that order, read as a float in
    0..2; else None. So a later unparseable `Rating:` fails the whole answer."""
    if not text or "Rating:" not in text:
        return None
    line = text.rsplit("Rating:", 1)[1].strip().split("\n", 1)[0].strip()
    line = line.replace("[", "").replace("]", "")
    line = line.rstrip(".").strip('"').strip("'").strip("*").strip()
    try:
        value = float(line)
    except ValueError:
        return None
    return value if 0.0 <= value <= 2.0 else None


def public_endpoint(base_url: str) -> str:
    """The base URL as recorded: no user:password, query or fragment (they may carry keys)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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


async def _rate(client, settings: JudgeSettings, prompt: str) -> tuple[float, str]:
    import openai  # optional: openai (eval extra)

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
                last = f"unparseable rating: {(text or '')[-120:]!r}"
            else:
                return value, getattr(resp, "model", None) or ""
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
    served = set()
    for aspect, value in zip(ASPECTS, results):
        if isinstance(value, Exception):
            out[f"{aspect}_score"] = None
            errors.append(f"{aspect}: {value}")
        else:
            out[f"{aspect}_score"], model = value
            served.add(model)
    out["judge_failed"] = bool(errors)
    out["judge_error"] = "; ".join(errors)
    out["judge_model"] = settings.model
    out["judge_endpoint"] = public_endpoint(settings.base_url)
    out["judge_model_served"] = ",".join(sorted(m for m in served if m)) or None
    return out


def latest_judgements(judge_dir: str | Path) -> dict[tuple, dict]:
    """The newest judgement per (concept_id, prompt_id, flowtime)."""
    rows = read_parts(judge_dir, JUDGE_SCHEMA).to_pylist()
    return {(r["concept_id"], r["prompt_id"], r["flowtime"]): r for r in rows}


def judge_models(rows: Sequence[dict]) -> Counter:
    """How many rows each judge model rated (None: rows written before models were recorded)."""
    return Counter(r.get("judge_model") for r in rows)


class MixedJudgesError(ValueError):
    pass


def _listing(models: Counter) -> str:
    return ", ".join(f"{m or 'unrecorded'} ({n} rows)" for m, n in models.most_common())


def check_one_judge(models: Counter, what: str, allow_mixed: bool) -> None:
    """Refuse rows from more than one judge model unless the caller allows it: never a silent mix."""
    if len(models) > 1 and not allow_mixed:
        raise MixedJudgesError(f"{what} holds judgements by different judge models: {_listing(models)}. Their "
                               "numbers are not comparable: judge into one directory per judge, or pass "
                               "--allow-mixed-judges")


async def judge_async(generations: Sequence[dict], judge_dir: str | Path, settings: JudgeSettings,
                      progress: bool = True, allow_mixed: bool = False) -> dict:
    from openai import AsyncOpenAI  # optional: openai (eval extra)

    done = latest_judgements(judge_dir)
    others = Counter({m: n for m, n in judge_models(list(done.values())).items() if m != settings.model})
    if others and not allow_mixed:  # a resume would keep the other judge's rows and add this one's
        raise MixedJudgesError(f"{judge_dir} already holds judgements by {_listing(others)}; judging into it with "
                               f"{settings.model} would mix judges. Use another output directory, or pass "
                               "--allow-mixed-judges")
    todo = [g for g in generations
            if (g["concept_id"], g["prompt_id"], g["flowtime"]) not in done
            or done[(g["concept_id"], g["prompt_id"], g["flowtime"])]["judge_failed"]]
    writer = PartWriter(judge_dir, schema_for_ids(JUDGE_SCHEMA, [g["concept_id"] for g in generations]))
    templates = load_templates()
    client = AsyncOpenAI(base_url=settings.base_url, api_key=settings.api_key, max_retries=0,
                         timeout=settings.timeout_seconds)
    sem = asyncio.Semaphore(settings.concurrency)
    bar = None
    if progress:
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


def judge(generations: Sequence[dict], judge_dir: str | Path, settings: JudgeSettings, progress: bool = True,
          allow_mixed: bool = False) -> dict:
    return asyncio.run(judge_async(generations, judge_dir, settings, progress, allow_mixed))
