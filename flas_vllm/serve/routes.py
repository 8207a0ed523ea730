"""FLAS HTTP routes for vLLM's API server, as a `vllm.endpoint_plugins` entry point.

- `/v1/flas/concepts` (GET: cached concepts, hit counts, slot use),
  `/v1/flas/concepts/preload` and `/v1/flas/concepts/evict` (POST `{"concepts": [...]}`);
  under `/v1`, so vLLM's `--api-key` middleware guards them like completions.
- `/metrics` gains `flas_*` series (steered requests, concept cache hits,
  misses, evictions, slots in use, encode time), refreshed from the workers.
- `/playground`: a page that streams steered and unsteered completions side by side.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from flas_vllm.core.config import FlasEngineOptions
from flas_vllm.core.errors import SteeringParamError
from flas_vllm.core.steering import check_concept

logger = logging.getLogger("flas_vllm.serve.server")

STATS_REFRESH_SECONDS = 1.0
MAX_CONCEPTS_PER_CALL = 1024


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, as vLLM's own routes answer."""
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": status}},
    )


async def _concept_list(request: Request) -> list[str] | JSONResponse:
    try:
        body = await request.json()
    except Exception:
        return _error(400, "request body must be JSON: {\"concepts\": [\"...\"]}", "concepts")
    concepts = body.get("concepts") if isinstance(body, dict) else None
    if not isinstance(concepts, list) or not concepts:
        return _error(400, "concepts: must be a non-empty list of strings", "concepts")
    if len(concepts) > MAX_CONCEPTS_PER_CALL:
        return _error(400, f"concepts: at most {MAX_CONCEPTS_PER_CALL} per call, got {len(concepts)}", "concepts")
    opts = request.app.state.flas_options
    for i, c in enumerate(concepts):
        try:
            check_concept(c, opts.max_concept_bytes, field=f"concepts[{i}]")
        except SteeringParamError as exc:
            return _error(400, str(exc), "concepts")
    return concepts


class FlasStats:
    """Latest FLAS counters from the workers, refreshed in the background for /metrics."""

    def __init__(self, engine_client):
        self.engine_client = engine_client
        self.latest: dict[str, Any] = {}
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, Any]:
        results = await self.engine_client.collective_rpc("flas_stats")
        self.latest = results[0] if results else {}
        return self.latest

    def start(self) -> None:
        async def loop():
            while True:
                try:
                    await self.refresh()
                except Exception as exc:  # a dying engine must not kill the metrics loop
                    logger.debug("flas stats refresh failed: %s", exc)
                await asyncio.sleep(STATS_REFRESH_SECONDS)

        self._task = asyncio.get_running_loop().create_task(loop())


class FlasMetricsCollector:
    """Prometheus collector over FlasStats.latest (no engine call at scrape time)."""

    def __init__(self, stats: FlasStats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # lazy: prometheus_client ships with vLLM, not with flas-vllm

        s = self.stats.latest
        counters = {
            "flas_steered_requests": ("Steered requests admitted by the workers", "steered_requests"),
            "flas_concept_cache_hits": ("Concept cache hits", "hits"),
            "flas_concept_cache_misses": ("Concept cache misses (concepts encoded for requests)", "misses"),
            "flas_concept_cache_evictions": ("Concepts evicted from their slot", "evictions"),
            "flas_concept_encode_seconds": ("Seconds spent encoding concepts", "encode_seconds"),
        }
        for name, (doc, key) in counters.items():
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], float(s.get(key, 0)))
            yield fam
        for name, doc, key in [
            ("flas_concept_slots_in_use", "Concept slots holding a concept", "slots_in_use"),
            ("flas_concept_slots_capacity", "Concept slots available (max_concepts)", "capacity"),
        ]:
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], float(s.get(key, 0)))
            yield fam


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/flas/concepts")
    async def list_concepts(request: Request):
        return await request.app.state.flas_stats.refresh()

    @router.post("/v1/flas/concepts/preload")
    async def preload(request: Request):
        concepts = await _concept_list(request)
        if isinstance(concepts, JSONResponse):
            return concepts
        try:
            slots = (await request.app.state.engine_client.collective_rpc("flas_preload", args=(concepts,)))[0]
        except Exception as exc:  # the worker refuses a pin budget overflow; the engine keeps serving
            if "max_pinned" in str(exc):
                return _error(400, str(exc).split("ValueError: ")[-1].strip(), "concepts")
            raise
        return {"preloaded": [{"concept": c, "slot": s} for c, s in zip(concepts, slots)]}

    @router.post("/v1/flas/concepts/evict")
    async def evict(request: Request):
        concepts = await _concept_list(request)
        if isinstance(concepts, JSONResponse):
            return concepts
        done = (await request.app.state.engine_client.collective_rpc("flas_evict", args=(concepts,)))[0]
        return {"evicted": [{"concept": c, "evicted": bool(d)} for c, d in zip(concepts, done)]}

    @router.get("/playground", response_class=HTMLResponse)
    async def playground():
        return resources.files("flas_vllm.data").joinpath("playground.html").read_text(encoding="utf-8")

    return router


class FlasEndpointPlugin:
    name = "flas_vllm_routes"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        state.flas_options = FlasEngineOptions.from_hf_config(engine_client.model_config.hf_config)
        state.flas_stats = FlasStats(engine_client)
        try:
            from prometheus_client import REGISTRY  # lazy: prometheus_client ships with vLLM, not with flas-vllm

            REGISTRY.register(FlasMetricsCollector(state.flas_stats))
        except ValueError:  # already registered in this process
            pass
        state.flas_stats.start()


def endpoint_plugin() -> FlasEndpointPlugin:
    return FlasEndpointPlugin()
