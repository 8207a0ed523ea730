"""`flas-vllm serve` on the other families (slow: `-m engine`): the real server and `openai` client.

Per family (one server alive at a time): a chat completion renders exactly the prompt the original
renders (`format_prompt`: Qwen3 non-thinking, Llama-3.1's system block) and its greedy steered and
unsteered tokens equal the transformers path's.
"""

from __future__ import annotations

import math

import pytest

from tests.serving import running_server
from tests.test_engine import hf_steerer, prompt_ids
from tests.test_engine_families import VARIANTS
from tests.texts import MID, SHORT

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
CASES = [(SHORT, "the ocean and sailing ships", 1.5), (MID, "love", 3.0), (SHORT, None, 0.0)]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request, tmp_path_factory):
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
    from flas_vllm.fixtures.family_models import ensure_family_model

    name = request.param
    model = ensure_family_model(name)
    ckpt = ensure_flas_checkpoint(model, **VARIANTS[name])
    log = tmp_path_factory.mktemp(f"server-{name}") / "server.log"
    with running_server(model, ckpt, log, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                        "--kv-cache-memory-bytes", str(256 * 1024 * 1024)) as srv:
        yield name, model, ckpt, srv


def test_chat_renders_the_originals_prompt_and_steers_as_transformers(served):
    from openai import OpenAI

    name, model, ckpt, srv = served
    client = OpenAI(base_url=srv["base"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    model_id = client.models.list().data[0].id
    steerer = hf_steerer(model, ckpt)
    for text, concept, flowtime in CASES:
        extra = {"return_token_ids": True, "ignore_eos": True}
        if concept:
            extra["vllm_xargs"] = {"flas_concept": concept, "flas_flowtime": flowtime}
        resp = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": text}], max_tokens=MAX_TOKENS, temperature=0.0,
            logprobs=True, extra_body=extra)
        what = f"{name}: {concept or 'unsteered'} at T={flowtime}"
        want_prompt = prompt_ids(model, text)
        assert resp.prompt_token_ids == want_prompt, f"{what}: the server rendered another prompt"
        choice = resp.choices[0]
        ref = steerer.generate([want_prompt], concept or "unused", [flowtime], max_new_tokens=MAX_TOKENS,
                               use_cache=True, ignore_eos=True)[0]
        assert len(choice.token_ids) == MAX_TOKENS
        if list(choice.token_ids) != list(ref.token_ids):
            i = next(i for i, (a, b) in enumerate(zip(choice.token_ids, ref.token_ids)) if a != b)
            pytest.fail(f"{what}: server and HF differ from step {i} (HF top-2 margin {ref.top2_margins[i]:.4f})")
        served_sum = sum(t.logprob for t in choice.logprobs.content)
        assert math.isclose(served_sum, sum(ref.logprobs), abs_tol=1e-3), what
