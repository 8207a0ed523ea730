"""The transformers path (HFSteerer), the parity oracle for the vLLM model: its own
invariants must hold exactly before it can judge anything else."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from flas_vllm.reference.hf import HFSteerer

CONCEPT = "sailing ships on a stormy ocean"
LOGPROB_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nb1(tiny_model, make_ckpt):
    return HFSteerer.from_pretrained(tiny_model, make_ckpt())


@pytest.fixture(scope="module")
def nb2(tiny_model, make_ckpt):
    return HFSteerer.from_pretrained(tiny_model, make_ckpt(num_blocks=2))


@pytest.fixture(scope="module")
def steerers(nb1, nb2):
    return {1: nb1, 2: nb2}


@pytest.fixture(scope="module")
def instructions():
    rows = json.loads(resources.files("flas_vllm.data").joinpath("alpaca_eval.json").read_text())
    return [r["instruction"] for r in rows]


@pytest.fixture(scope="module")
def long_prompts(nb1, instructions):
    """Three prompts longer than the tiny model's sliding window (32), of different lengths."""
    picked, lengths = [], set()
    for text in instructions:
        n = len(nb1.prompt_ids(text))
        if 45 <= n <= 110 and all(abs(n - m) >= 8 for m in lengths):
            picked.append(text)
            lengths.add(n)
        if len(picked) == 3:
            break
    assert len(picked) == 3
    return picked


@pytest.fixture(scope="module")
def short_prompts(instructions):
    return [t for t in instructions if len(t) < 80][:6]


def assert_same(a, b, tol=LOGPROB_TOL):
    assert a.token_ids == b.token_ids
    assert len(a.logprobs) == len(b.logprobs)
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tol


def assert_identical(a, b):
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs  # bit for bit
    assert a.top2_margins == b.top2_margins


# ---------------------------------------------------------------------------
# (i) cached incremental decoding == full recompute without any cache


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_cached_decoding_equals_full_recompute(steerers, long_prompts, num_blocks):
    st = steerers[num_blocks]
    lengths = [len(st.prompt_ids(p)) for p in long_prompts]
    assert min(lengths) > 40 and len(set(lengths)) == 3  # left padding is in play
    times = [0.5, 1.25, 2.0]
    kw = dict(max_new_tokens=32, ignore_eos=True)
    cached = st.generate(long_prompts, CONCEPT, times, use_cache=True, **kw)
    full = st.generate(long_prompts, CONCEPT, times, use_cache=False, **kw)
    for a, b in zip(cached, full):
        assert len(a.token_ids) == 32
        assert_same(a, b)


# ---------------------------------------------------------------------------
# (ii) flowtime 0 is the unsteered model, bit for bit


def test_flowtime_zero_is_the_plain_model(nb1, long_prompts):
    prompt = long_prompts[0]
    got = nb1.generate([prompt], CONCEPT, 0.0, max_new_tokens=20, ignore_eos=True)[0]
    none = nb1.generate([prompt], None, 0.0, max_new_tokens=20, ignore_eos=True)[0]
    assert_identical(got, none)
    # against transformers' own greedy generation with the bare model
    ids = torch.tensor([nb1.prompt_ids(prompt)])
    model = nb1.model
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=nb1.tokenizer.pad_token_id)
    ref_tokens = out.sequences[0, ids.shape[1]:].tolist()  # may stop early at EOS
    assert len(ref_tokens) >= 5
    ref_lp = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ref_tokens)]
    assert got.token_ids[: len(ref_tokens)] == ref_tokens
    assert max(abs(x - y) for x, y in zip(got.logprobs, ref_lp)) <= LOGPROB_TOL


def test_flowtime_zero_layer_output_untouched(nb1, long_prompts):
    """With a steered row in the batch the hook runs; the T=0 row's residual stream is not touched."""
    layer = nb1.model.model.layers[nb1.cfg.layer + 1]
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True
    )
    try:
        nb1.generate(long_prompts[:2], CONCEPT, [0.0, 1.0], max_new_tokens=1)
        nb1.generate(long_prompts[:2], None, 0.0, max_new_tokens=1)
    finally:
        handle.remove()
    steered, plain = seen
    assert torch.equal(steered[0], plain[0])
    assert not torch.equal(steered[1], plain[1])


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_mixed_batch_unsteered_rows_are_exact(steerers, long_prompts, short_prompts, num_blocks):
    st = steerers[num_blocks]
    prompts = [long_prompts[0], short_prompts[0], long_prompts[1], short_prompts[1]]
    kw = dict(max_new_tokens=24, ignore_eos=True)
    mixed = st.generate(prompts, CONCEPT, [0.0, 1.5, 0.0, 2.0], **kw)
    plain = st.generate(prompts, None, 0.0, **kw)
    assert_identical(mixed[0], plain[0])
    assert_identical(mixed[2], plain[2])
    assert mixed[1].token_ids != plain[1].token_ids or mixed[3].token_ids != plain[3].token_ids


def test_bf16_flow_on_fp32_model(tiny_model, make_ckpt, long_prompts):
    """The flow runs in its checkpoint's dtype; h is cast in and back, T=0 rows stay exact."""
    st = HFSteerer.from_pretrained(tiny_model, make_ckpt(dtype="bfloat16"))
    assert st.flow.dtype == torch.bfloat16 and next(st.model.parameters()).dtype == torch.float32
    prompts = long_prompts[:2]
    mixed = st.generate(prompts, CONCEPT, [0.0, 2.0], max_new_tokens=16, ignore_eos=True)
    plain = st.generate(prompts, None, 0.0, max_new_tokens=16, ignore_eos=True)
    assert_identical(mixed[0], plain[0])
    assert mixed[1].token_ids != plain[1].token_ids


# ---------------------------------------------------------------------------
# (iii) steering visibly changes greedy output


@pytest.mark.parametrize("flowtime", [1.0, 2.0])
def test_steering_changes_greedy_output(nb1, short_prompts, flowtime):
    kw = dict(max_new_tokens=16)
    steered = nb1.generate(short_prompts, CONCEPT, flowtime, **kw)
    plain = nb1.generate(short_prompts, None, 0.0, **kw)
    changed = sum(s.token_ids != p.token_ids for s, p in zip(steered, plain))
    assert 2 * changed > len(short_prompts), f"only {changed}/{len(short_prompts)} generations changed"


def test_different_concepts_steer_differently(nb1, short_prompts):
    a = nb1.generate(short_prompts[:3], CONCEPT, 2.0, max_new_tokens=12)
    b = nb1.generate(short_prompts[:3], "cooking pasta in a small kitchen", 2.0, max_new_tokens=12)
    assert any(x.token_ids != y.token_ids for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# (iv) left padding does not change results


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_left_padding_is_invisible(steerers, long_prompts, short_prompts, num_blocks):
    st = steerers[num_blocks]
    kw = dict(max_new_tokens=20, ignore_eos=True)
    alone = st.generate([short_prompts[2]], CONCEPT, 1.5, **kw)[0]
    batch = st.generate([long_prompts[2], short_prompts[2], long_prompts[0]], CONCEPT, [2.0, 1.5, 0.5], **kw)
    assert len(st.prompt_ids(short_prompts[2])) < len(st.prompt_ids(long_prompts[0]))  # it really is padded
    assert_same(alone, batch[1])
    long_alone = st.generate([long_prompts[0]], CONCEPT, 0.5, **kw)[0]
    assert_same(long_alone, batch[2])


# ---------------------------------------------------------------------------
# (v) seeded sampling is reproducible


def test_seeded_sampling_is_reproducible(nb1, short_prompts):
    kw = dict(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    prompts = short_prompts[:3]
    a = nb1.generate(prompts, CONCEPT, [1.0, 0.0, 2.0], seed=1234, **kw)
    b = nb1.generate(prompts, CONCEPT, [1.0, 0.0, 2.0], seed=1234, **kw)
    for x, y in zip(a, b):
        assert_identical(x, y)
    c = nb1.generate(prompts, CONCEPT, [1.0, 0.0, 2.0], seed=4321, **kw)
    assert any(x.token_ids != z.token_ids for x, z in zip(a, c))
    d = nb1.generate(prompts, CONCEPT, [1.0, 0.0, 2.0], seed=1234, top_p=0.8, **kw)
    e = nb1.generate(prompts, CONCEPT, [1.0, 0.0, 2.0], seed=1234, top_p=0.8, **kw)
    for x, y in zip(d, e):
        assert_identical(x, y)


def test_flowtimes_length_must_match(nb1, short_prompts):
    with pytest.raises(ValueError, match="flowtimes"):
        nb1.generate(short_prompts[:2], CONCEPT, [1.0, 1.0, 1.0], max_new_tokens=1)


def test_multimodal_gemma3_steers_its_text_decoder_exactly_as_the_text_model(tmp_path):
    """google/gemma-3-4b-* are multimodal: the transformers path must steer the language model inside.

    The same text decoder saved as a plain `Gemma3ForCausalLM` is the reference: greedy steered
    generations and their scores must be identical (fp32).
    """
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
    from flas_vllm.fixtures.family_models import ensure_family_model

    mm_dir = ensure_family_model("gemma3-mm")
    mm = AutoModelForCausalLM.from_pretrained(str(mm_dir), dtype=torch.float32, attn_implementation="eager")
    assert type(mm).__name__ == "Gemma3ForConditionalGeneration"  # what the original loads for these bases
    text_dir = tmp_path / "text-only"
    text = Gemma3ForCausalLM(mm.config.text_config)
    text.model.load_state_dict(mm.model.language_model.state_dict())
    text.lm_head.weight = text.model.embed_tokens.weight
    text.save_pretrained(text_dir)
    for f in mm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, text_dir / f.name)
    text = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(str(mm_dir))
    ckpt = ensure_flas_checkpoint(mm_dir, num_blocks=1, layer=3, disable_self_attn=True)
    prompt = tok("Write a short story about a lighthouse keeper.")["input_ids"]
    prompts = [prompt, prompt]  # steered at T=2, and unsteered
    outs = {}
    for name, model in (("multimodal", mm), ("text", text)):
        steerer = HFSteerer(model, tok, str(ckpt))
        outs[name] = steerer.generate(prompts, "the ocean and sailing ships", [2.0, 0.0], max_new_tokens=12,
                                      ignore_eos=True)
    for got, want in zip(outs["multimodal"], outs["text"]):
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs
    assert outs["multimodal"][0].token_ids != outs["multimodal"][1].token_ids  # the flow did steer
