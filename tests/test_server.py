"""`flas-vllm serve`: the real server on 127.0.0.1, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from tests.serving import running_server

pytestmark = pytest.mark.engine

API_KEY = "test-key"
MAX_TOKENS = 12
CONCEPTS = [
    "talk like a pirate", "the color blue", "references to cooking", "medieval castles",
    "quantum physics", "happy dogs", "the ocean", "space travel", "French food",
    "jazz music", "rainy weather", "ancient Rome",
]
PROMPTS = [
    "Give three tips for staying healthy.",
    "Describe the city of Paris.",
    "Write a short poem about the ocean.",
    "What is the capital of France?",
]
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, kv_cache_memory_bytes=256 * 1024 * 1024, enforce_eager=True)


def _cases():
    """>= 32 requests over 12 concepts (plus unsteered), alternating chat/completions and streaming."""
    cases = []
    for i in range(36):
        concept = CONCEPTS[i % len(CONCEPTS)] if i % 9 != 8 else None
        cases.append({
            "prompt": PROMPTS[i % len(PROMPTS)],
            "concept": concept,
            "flowtime": [1.0, 2.0, 0.5][i % 3],
            "chat": i % 2 == 0,
            "stream": (i // 2) % 2 == 0,
        })
    return cases


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(num_blocks=1)


@pytest.fixture(scope="module")
def offline_results(tiny_model, ckpt):
    """Each case's greedy output from offline FlasLLM (the reference the server must match)."""
    from vllm import SamplingParams

    from flas_vllm import FlasLLM, steering
    from flas_vllm.engine.llm import shutdown_engine

    llm = FlasLLM(str(tiny_model), str(ckpt), max_concepts=16, **ENGINE_ARGS)
    results = []
    for case in _cases():
        extra = steering(case["concept"], case["flowtime"]) if case["concept"] else None
        sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)
        if case["chat"]:
            out = llm.chat([[{"role": "user", "content": case["prompt"]}]], sp, use_tqdm=False)
        else:
            out = llm.generate([case["prompt"]], sp, use_tqdm=False)
        results.append(out[0].outputs[0].text)
    shutdown_engine(llm)
    del llm
    return results


@pytest.fixture(scope="module")
def server(tiny_model, ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_model, ckpt, log, "--max-concepts", "16", "--dtype", "float32", "--max-model-len", "512",
                        "--enforce-eager", "--kv-cache-memory-bytes", str(256 * 1024 * 1024), api_key=API_KEY) as srv:
        yield srv


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _model_id(client) -> str:
    return client.models.list().data[0].id


def test_startup_logs_name_checkpoint_layer_steps_slots_and_url(server, ckpt):
    text = server["log"].read_text()
    line = next(line for line in text.splitlines() if "FLAS server:" in line)
    assert str(ckpt) in line and "layer 2" in line and "n_steps 3" in line
    assert "16 concept slots" in line and server["base"] in line
    # the engine core's own INFO line, shown by vLLM's handler (engine/log_routing.py)
    engine = next(line for line in text.splitlines() if "FLAS: " in line and "fingerprint" in line)
    assert " INFO " in engine and str(ckpt) in engine and "extra KV layers" in engine


def test_concurrent_multi_tenant_requests_equal_offline(server, offline_results):
    from openai import AsyncOpenAI

    aclient = AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(case, model):
        extra = {"vllm_xargs": {"flas_concept": case["concept"], "flas_flowtime": case["flowtime"]}} \
            if case["concept"] else {}
        common = dict(model=model, max_tokens=MAX_TOKENS, temperature=0.0, extra_body=extra)
        if case["chat"]:
            messages = [{"role": "user", "content": case["prompt"]}]
            if case["stream"]:
                text = ""
                async for chunk in await aclient.chat.completions.create(messages=messages, stream=True, **common):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                return text
            resp = await aclient.chat.completions.create(messages=messages, **common)
            return resp.choices[0].message.content
        if case["stream"]:
            text = ""
            async for chunk in await aclient.completions.create(prompt=case["prompt"], stream=True, **common):
                if chunk.choices:
                    text += chunk.choices[0].text
            return text
        resp = await aclient.completions.create(prompt=case["prompt"], **common)
        return resp.choices[0].text

    async def run_all():
        model = (await aclient.models.list()).data[0].id
        return await asyncio.gather(*(one(c, model) for c in _cases()))

    got = asyncio.run(run_all())
    cases = _cases()
    assert len(cases) >= 32 and len({c["concept"] for c in cases if c["concept"]}) >= 12
    mismatches = [(i, c, g, w) for i, (c, g, w) in enumerate(zip(cases, got, offline_results)) if g != w]
    assert not mismatches, mismatches[:3]


BAD_XARGS = [
    ({"flas_concept": "pirate", "flas_flowtime": float("nan")}, "flas_flowtime"),
    ({"flas_concept": "pirate", "flas_flowtime": float("inf")}, "flas_flowtime"),
    ({"flas_concept": "pirate", "flas_flowtime": -1.0}, "flas_flowtime"),
    ({"flas_concept": "pirate", "flas_flowtime": 9.5}, "flas_flowtime"),
    ({"flas_concept": "pirate", "flas_flowtime": "1.5"}, "flas_flowtime"),
    ({"flas_concept": "", "flas_flowtime": 1.0}, "flas_concept"),
    ({"flas_concept": "x" * 5000, "flas_flowtime": 1.0}, "flas_concept"),
    ({"flas_concept": 12, "flas_flowtime": 1.0}, "flas_concept"),
    ({"flas_concept": "pirate", "flas_flowtime": 1.0, "flas_bogus": 1}, "flas_bogus"),
    ({"flas_concept": "pirate", "flas_flowtime": 1.0, "flas_n_steps": 99}, "flas_n_steps"),
    ({"flas_concept": "pirate", "flas_flowtime": 1.0, "flas_n_steps": 0}, "flas_n_steps"),
    ({"flas_stop_rule": "sometimes"}, "flas_stop_rule"),
]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_bad_steering_input_is_a_400_naming_the_field_and_the_server_keeps_serving(server, route):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    model = httpx.get(server["base"] + "/v1/models", headers=headers).json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 4}
    if route == "completions":
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    for xargs, field in BAD_XARGS:
        # json.dumps writes NaN/Infinity tokens, as a careless client would
        r = httpx.post(f"{server['base']}/v1/{route}", headers=headers,
                       content=json.dumps({**body, "vllm_xargs": xargs}), timeout=60)
        assert r.status_code == 400, (xargs, r.status_code, r.text)
        err = r.json()["error"]
        assert field in err["message"], (xargs, err)
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200
    ok = httpx.post(f"{server['base']}/v1/{route}", headers=headers, timeout=120,
                    content=json.dumps({**body, "vllm_xargs": {"flas_concept": "pirate", "flas_flowtime": 1.0}}))
    assert ok.status_code == 200, ok.text
    ok = httpx.post(f"{server['base']}/v1/{route}", headers=headers, timeout=120, content=json.dumps(
        {**body, "vllm_xargs": {"flas_concept": "pirate", "flas_flowtime": 1.0, "flas_n_steps": 1,
                                "flas_stop_rule": "original"}}))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_enforced_on_every_route(server, key):
    import httpx

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    routes = [
        ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),  # the playground's first data call
        ("GET", "/v1/flas/concepts", None),
        ("POST", "/v1/flas/concepts/preload", {"concepts": ["pirate"]}),
        ("POST", "/v1/flas/concepts/evict", {"concepts": ["pirate"]}),
    ]
    for method, path, body in routes:
        r = httpx.request(method, server["base"] + path, headers=headers,
                          content=json.dumps(body) if body is not None else None, timeout=30)
        assert r.status_code == 401, (path, r.status_code)


def test_concept_endpoints_preload_hit_evict_miss_and_metrics(server, client):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = server["base"]
    concept = "a concept only this test uses"
    model = _model_id(client)

    def stats():
        return httpx.get(base + "/v1/flas/concepts", headers=headers, timeout=30).json()

    r = httpx.post(base + "/v1/flas/concepts/preload", headers=headers, json={"concepts": [concept]}, timeout=60)
    assert r.status_code == 200 and r.json()["preloaded"][0]["concept"] == concept
    listed = {e["concept"]: e for e in stats()["concepts"]}
    assert listed[concept]["pinned"]
    before = stats()
    client.completions.create(model=model, prompt="Hello", max_tokens=2,
                              extra_body={"vllm_xargs": {"flas_concept": concept, "flas_flowtime": 1.0}})
    after = stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert {e["concept"]: e for e in after["concepts"]}[concept]["hits"] >= 1

    # a pinned concept is released by evict; the next use must encode it again
    r = httpx.post(base + "/v1/flas/concepts/evict", headers=headers, json={"concepts": [concept]}, timeout=60)
    assert r.status_code == 200
    client.completions.create(model=model, prompt="Hello", max_tokens=1)  # lets the worker drop finished refs
    r = httpx.post(base + "/v1/flas/concepts/evict", headers=headers, json={"concepts": [concept]}, timeout=60)
    assert r.json()["evicted"][0]["evicted"] in (True, False)
    assert concept not in {e["concept"] for e in stats()["concepts"]}
    before = stats()
    client.completions.create(model=model, prompt="Hello", max_tokens=2,
                              extra_body={"vllm_xargs": {"flas_concept": concept, "flas_flowtime": 1.0}})
    after = stats()
    assert after["misses"] == before["misses"] + 1

    bad = httpx.post(base + "/v1/flas/concepts/preload", headers=headers, json={"concepts": [""]}, timeout=30)
    assert bad.status_code == 400 and "concepts[0]" in bad.json()["error"]["message"]
    bad = httpx.post(base + "/v1/flas/concepts/preload", headers=headers, json={"nope": 1}, timeout=30)
    assert bad.status_code == 400 and "concepts" in bad.json()["error"]["message"]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(base + "/metrics", timeout=30).text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("flas_") and " " in line}
        if values.get("flas_concept_cache_misses_total", 0) >= after["misses"]:
            break
        time.sleep(0.5)
    for name in ["flas_steered_requests_total", "flas_concept_cache_hits_total", "flas_concept_cache_misses_total",
                 "flas_concept_cache_evictions_total", "flas_concept_slots_in_use", "flas_concept_encode_seconds_total"]:
        assert name in values, name
    assert values["flas_concept_cache_misses_total"] >= after["misses"]
    assert "vllm:" in metrics  # vLLM's own metrics are still there


def test_playground_screenshot_shows_both_columns(server, tmp_path):
    from tests.cdp import ChromiumPage, find_chromium

    if find_chromium() is None:
        pytest.fail("chromium is not installed: scripts/run-tests.sh installs Debian's chromium package")
    url = f"{server['base']}/playground?autorun=1&key={API_KEY}"
    with ChromiumPage() as page:
        page.goto(url)
        page.wait_for("document.body.dataset.done", timeout=180)
        done = page.evaluate("document.body.dataset.done")
        status = page.evaluate("document.getElementById('status').textContent")
        assert done == "1", status
        unsteered = page.evaluate("document.getElementById('unsteered').textContent")
        steered = page.evaluate("document.getElementById('steered').textContent")
        shot = page.screenshot(tmp_path / "playground.png")
    assert unsteered.strip() and steered.strip()
    assert shot.stat().st_size > 10_000
    out = Path(os.environ.get("FLAS_VLLM_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "playground.png").write_bytes(shot.read_bytes())
